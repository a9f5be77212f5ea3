"""The Ray Tune trainable: wiring only. The engine does the work.

``train_trial(config, data, pretrained=...)`` is a plain function trainable. The
driver binds ``data`` and the pretrained VGG16 weights with ``tune.with_parameters``
so they sit in Ray's object store once and every trial on a node reads the same
memory; no trial opens a file on the driver's disk, which on a cluster it cannot
see. A trial whose family asks for more than one worker trains data-parallel
(``data_parallel``); every other trial trains here, on the device Ray gave it.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cxrtune.trainables.checkpoints import (
    CUDA_RNG_KEY,
    GRAD_SCALER_KEY,
    newest_readable_state,
    save_checkpoint,
)
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import (
    Precision,
    choose_precision,
    epoch_indices,
    evaluate,
    grad_scaler,
    loss_class_weights,
    train_one_epoch,
)
from cxrtune.trainables.failures import own_failures_end_the_trial
from cxrtune.trainables.metrics import DEFAULT_TARGET_SPECIFICITY, classification_metrics
from cxrtune.trainables.models import StateDict, create_model

logger = logging.getLogger(__name__)

# How long a trial given a GPU waits for the memory a stopped trial's process
# still holds on it, and what share of its reservation it needs free to start.
DEVICE_MEMORY_WAIT_S = 60.0
DEVICE_MEMORY_SLACK = 0.10  # CUDA contexts of the processes sharing the GPU


@dataclass(frozen=True)
class TrialData:
    """What every trial shares: the train and val images (never test) and class facts."""

    train_images: np.ndarray  # N x 1 x H x W uint8
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    class_names: tuple[str, ...]
    positive_index: int
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY  # for val_covid_recall_at_spec

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


@dataclass(frozen=True)
class WorkerResources:
    """A data-parallel trial: ``workers`` processes, each holding ``cpus`` and ``gpus``."""

    workers: int
    cpus: float
    gpus: float


def train_trial(
    config: dict[str, Any],
    data: TrialData,
    data_parallel: Mapping[str, WorkerResources] | None = None,
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
    data_parallel: Mapping[str, WorkerResources] | None,
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
        from cxrtune.trainables.data_parallel import train_data_parallel

        train_data_parallel(trial, data, state, data_parallel[trial.family], pretrained)
        return

    assigned = assigned_resources()
    try:
        if assigned.device.type == "cuda":
            wait_for_device_memory(assigned.gpus, lambda: torch.cuda.mem_get_info(assigned.device))
        train_on_one_device(trial, data, state, assigned.threads, assigned.device, pretrained)
    except BaseException as error:
        # A stopped or failed trial leaves through an exception whose traceback
        # holds every frame's locals: the model, the optimizer and the dataset on
        # the GPU. Clearing them lets the memory go back below.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        release_device_memory(assigned.device)


def train_on_one_device(
    trial: TrialConfig,
    data: TrialData,
    state: dict[str, Any] | None,
    threads: int,
    device: torch.device,
    pretrained: StateDict | None = None,
) -> None:
    """The epoch loop of a trial that trains in this process."""
    from ray import tune

    torch.set_num_threads(threads)
    torch.manual_seed(trial.seed)
    generator = torch.Generator().manual_seed(trial.seed)
    model = create_model(trial, len(data.class_names), data.image_size, pretrained).to(device)
    optimizer = build_optimizer(trial, model)
    precision = choose_precision(device)
    scaler = grad_scaler(device, precision)
    completed_epochs = restore(state, model, optimizer, generator, scaler) if state else 0

    train_images, train_labels = on_device(data.train_images, data.train_labels, device)
    val_images, val_labels = on_device(data.val_images, data.val_labels, device)
    class_weights = loss_class_weights(data.train_labels, len(data.class_names), trial.imbalance)
    for epoch in range(completed_epochs + 1, trial.max_epochs + 1):
        started = time.perf_counter()
        order = epoch_indices(data.train_labels, trial.imbalance, generator)
        train_loss = train_one_epoch(
            model,
            optimizer,
            train_images,
            train_labels,
            order,
            batch_size=trial.batch_size,
            class_weights=class_weights,
            augment_strength=trial.augment_strength,
            generator=generator,
            precision=precision,
            scaler=scaler,
        )
        metrics = epoch_metrics(
            epoch, train_loss, model, val_images, val_labels, data, precision, started
        )
        with tempfile.TemporaryDirectory() as directory:
            save_epoch_checkpoint(
                Path(directory), model, optimizer, trial, generator, data, metrics, scaler
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Load a checkpoint's state into a fresh trial; returns the epochs it had completed.

    The CUDA generator is restored when the checkpoint has one and CUDA is here;
    ``scaler`` (an fp16 trial's) takes the checkpoint's scale when it has one. A
    checkpoint written in another precision leaves the scaler as it starts.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if CUDA_RNG_KEY in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[CUDA_RNG_KEY].cpu())
    if scaler is not None and GRAD_SCALER_KEY in state:
        scaler.load_state_dict(state[GRAD_SCALER_KEY])
    return int(state["epoch"])


def epoch_metrics(
    epoch: int,
    train_loss: float,
    model: torch.nn.Module,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    data: TrialData,
    precision: Precision,
    started: float,
) -> dict[str, Any]:
    """Evaluate on val and build the flat, split-prefixed dict an epoch reports."""
    val_loss, probabilities = evaluate(model, val_images, val_labels, precision=precision)
    scores = classification_metrics(
        data.val_labels,
        probabilities,
        data.class_names,
        data.positive_index,
        target_specificity=data.target_specificity,
    )
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **{f"val_{name}": value for name, value in scores.items()},
        "epoch_time_s": time.perf_counter() - started,
        # What the numbers were computed in, so results say what ran.
        "precision": precision,
    }


def save_epoch_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trial: TrialConfig,
    generator: torch.Generator,
    data: TrialData,
    metrics: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write the checkpoint of the epoch ``metrics`` describe into ``directory``."""
    save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        config=trial,
        epoch=metrics["epoch"],
        generator=generator,
        class_names=data.class_names,
        image_size=data.image_size,
        metrics=metrics,
        scaler=scaler,
    )


def build_optimizer(config: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the Keras ``kernel_regularizer`` the study used) or AdamW."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: adam, adamw")


def on_device(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and labels as tensors on ``device``; called once per trial.

    Every batch is then cut from them there, with no copy from the host per step.
    """
    # Arrays from Ray's object store are read-only views of shared memory; torch
    # warns about that, but nothing here writes to them, and copying would defeat
    # the sharing (on a GPU, ``.to`` copies anyway).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image_tensor = torch.from_numpy(images)
    return image_tensor.to(device), torch.as_tensor(labels, dtype=torch.long, device=device)


class AssignedResources(NamedTuple):
    """What Ray gave this trial: CPU threads, the device, and its share of a GPU."""

    threads: int
    device: torch.device
    gpus: float


def assigned_resources() -> AssignedResources:
    """The CPU threads, the device and the GPU share Ray gave this trial."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1.0)))
    gpus = float(assigned.get("GPU", 0.0))
    use_gpu = gpus > 0 and torch.cuda.is_available()
    return AssignedResources(threads, torch.device("cuda" if use_gpu else "cpu"), gpus)


def release_device_memory(device: torch.device) -> None:
    """Give the GPU memory this process cached back to the device.

    A stopped trial's tensors are freed when its function unwinds, but torch's
    caching allocator keeps the blocks reserved until the process exits, and Ray
    hands the GPU to the next trial before that: Tune's function trainable stops
    without waiting for the training thread (``session.finish(timeout=0)``) and
    the actor process exits later still (ray-project/ray#23971, #30414: trials
    stopped by ASHA leaving the next one out of memory). This runs in the
    training thread as it unwinds, which is well before a new trial's process
    has started and imported torch.
    """
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def wait_for_device_memory(
    gpus: float,
    free_memory: Callable[[], tuple[int, int]],
    *,
    timeout_s: float = DEVICE_MEMORY_WAIT_S,
    poll_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait until the GPU has the memory this trial reserved free; ``False`` on timeout.

    ``free_memory`` returns ``(free, total)`` bytes of the whole device, as
    ``torch.cuda.mem_get_info`` does. A trial given ``gpus`` (a share of one
    GPU, at most 1) needs that share of the total free, less
    ``DEVICE_MEMORY_SLACK``. The other side of ``release_device_memory``: what a
    stopped trial's process still holds is gone once that process has exited,
    which Ray does not wait for. After ``timeout_s`` the trial starts anyway (a
    neighbour may simply use more than its share) and says so.
    """
    deadline = clock() + timeout_s
    while True:
        free, total = free_memory()
        needed = (min(gpus, 1.0) - DEVICE_MEMORY_SLACK) * total
        if free >= needed:
            return True
        if clock() >= deadline:
            logger.warning(
                "starting with %.1f GiB of GPU memory free, less than the %.1f GiB this "
                "trial's share of the GPU would leave",
                free / 2**30,
                needed / 2**30,
            )
            return False
        sleep(poll_s)
