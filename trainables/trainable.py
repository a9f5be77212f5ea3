"""The Ray Tune trainable: wiring only. ``fit`` holds the epoch loop, the engine the work.

``train_trial(config, data, pretrained=...)`` is a plain function trainable. The
driver binds ``data`` and the pretrained VGG16 weights with ``tune.with_parameters``
so they sit in Ray's object store once and every trial on a node reads the same
memory; no trial opens a file on the driver's disk, which on a cluster it cannot
see. A trial whose family asks for more than one worker trains data-parallel
(``data_parallel``); every other trial trains here, on the device Ray gave it,
reporting each epoch to Tune (``TuneReports``).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxrtune.trainables.checkpoints import newest_readable_state
from cxrtune.trainables.config import FamilyResources, TrialConfig
from cxrtune.trainables.devices import (
    assigned_resources,
    release_device_memory,
    wait_for_device_memory,
)
from cxrtune.trainables.failures import own_failures_end_the_trial
from cxrtune.trainables.fit import TrialData, fit
from cxrtune.trainables.models import StateDict

__all__ = ["TuneReports", "train_trial"]


def train_trial(
    config: dict[str, Any],
    data: TrialData,
    data_parallel: Mapping[str, FamilyResources] | None = None,
    pretrained: StateDict | None = None,
) -> None:
    """Train one trial, reporting metrics and a checkpoint to Ray Tune every epoch.

    ``data_parallel`` maps the families that train on several workers to their
    workers' resources; the others train in this process. ``pretrained`` is the
    state dict of the sweep's pretrained VGG16 weights (read on the driver), used
    by the trials whose config names weights.

    A failure of the trial's own (a non-finite loss, a bad config, weights that do
    not fit, a bug) ends it with a last result carrying the error, so Tune does not
    retry it; an infrastructure failure propagates, for Tune to retry
    (``cxrtune.trainables.failures``).
    """
    with own_failures_end_the_trial():
        run_trial(config, data, data_parallel, pretrained)


def run_trial(
    config: dict[str, Any],
    data: TrialData,
    data_parallel: Mapping[str, FamilyResources] | None,
    pretrained: StateDict | None,
) -> None:
    """``train_trial``'s work: restore, then train in this process or data-parallel."""
    from ray import tune

    trial = TrialConfig.from_dict(config)
    state: dict[str, Any] | None = None
    if checkpoint := tune.get_checkpoint():
        state = newest_readable_state(checkpoint)
    if trial.weights == "none":
        pretrained = None

    if data_parallel and trial.family in data_parallel:
        # Ray Train loads only in the trials that train data-parallel.
        from cxrtune.trainables.data_parallel import train_data_parallel

        train_data_parallel(trial, data, state, data_parallel[trial.family], pretrained)
        return

    assigned = assigned_resources()
    try:
        if assigned.device.type == "cuda":
            wait_for_device_memory(assigned.gpus, lambda: torch.cuda.mem_get_info(assigned.device))
        torch.set_num_threads(assigned.threads)
        fit(trial, data, state, assigned.device, TuneReports(), pretrained)
    except BaseException as error:
        # A stopped or failed trial leaves through an exception whose traceback
        # holds every frame's locals: the model, the optimizer and the dataset on
        # the GPU. Clearing them lets the memory go back below.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        release_device_memory(assigned.device)


class TuneReports:
    """A trial training in this process: rank 0 of 1, reporting each epoch to Tune."""

    rank = 0
    world_size = 1

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def mean_train_loss(self, loss: float, device: torch.device) -> float:
        return loss

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        from ray import tune

        tune.report(
            metrics,
            checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None,
        )
