"""Held-out test evaluation on the sweep's Ray cluster: one task per chosen checkpoint.

After a sweep the leaderboard evaluates its top trials on test. ``ray_evaluator`` gives
``build_leaderboard`` an evaluator that runs them as Ray tasks, in parallel on the
cluster's GPUs, instead of one after another on the driver. It lives here, not in
``analysis``, because ``analysis`` must not import Ray.

The val and test images go into the object store once (``ray.put``) and every task reads
them from there. Each task reads its checkpoint from the experiment dir's own storage,
not from the driver: on a multi-node cluster the driver's disk is not visible to the
workers, while the experiment dir is by construction, since the trials on those workers
wrote the checkpoints there (an NFS folder mounted at the same path on every node, or
``s3://``). For an ``s3://`` experiment the driver reads from a local mirror, so a task is
given the checkpoint's URI and downloads it into a temporary folder. Sending the
checkpoint bytes through the object store instead would push every checkpoint (a VGG16
one with its optimizer state is a few hundred MB) through the driver's memory and network.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cxrtune.analysis.experiment import SPLITS_FILE, Evaluations, Evaluator, Experiment
from cxrtune.analysis.storage import joined, local_copy, redacted

__all__ = ["EVALUATION_GPUS", "ray_evaluator", "task_resources"]

# Each evaluation task's share of a GPU where the cluster has GPUs: inference on val and
# test needs far less memory than training, so four share one GPU.
EVALUATION_GPUS = 0.25


def ray_evaluator(experiment_location: str | Path, local_dir: Path) -> Evaluator:
    """An evaluator for ``build_leaderboard`` that runs on the connected Ray cluster.

    ``experiment_location`` is where the sweep wrote the experiment (a folder or an
    ``s3://`` URI); ``local_dir`` is the folder the leaderboard reads it from (the same
    folder, or the local mirror of a URI). Without a connected Ray it evaluates in this
    process, as ``cxrtune leaderboard`` does.
    """
    return partial(
        evaluate_on_ray, experiment_location=str(experiment_location), local_dir=local_dir
    )


def task_resources(cluster: Mapping[str, float]) -> dict[str, float]:
    """What one evaluation task reserves on a cluster offering ``cluster`` (Ray's totals)."""
    if cluster.get("GPU", 0) > 0:
        return {"num_cpus": 1, "num_gpus": EVALUATION_GPUS}
    return {"num_cpus": 1}


def evaluate_on_ray(
    experiment: Experiment,
    checkpoints: Mapping[str, Path],
    *,
    experiment_location: str,
    local_dir: Path,
) -> Evaluations:
    """Evaluate ``checkpoints`` (trial id -> checkpoint folder) as parallel Ray tasks.

    A checkpoint that cannot be read is reported in ``unreadable``, as the in-process
    evaluator reports it; any other error of a task is raised here.
    """
    import ray

    # torch loads only in a sweep or command that evaluates checkpoints.
    from cxrtune.analysis.evaluation import EvaluationSet, evaluate_in_process

    if not ray.is_initialized():
        return evaluate_in_process(experiment, checkpoints)
    if not checkpoints:
        return Evaluations({})
    evaluation_set = EvaluationSet.load(experiment.dataset, experiment.directory / SPLITS_FILE)
    shared = ray.put(evaluation_set)
    task = ray.remote(evaluate_task).options(**task_resources(ray.cluster_resources()))
    pending = {
        trial_id: task.remote(
            checkpoint_location(checkpoint, experiment_location, local_dir), shared
        )
        for trial_id, checkpoint in checkpoints.items()
    }
    outcomes = dict(zip(pending, ray.get(list(pending.values())), strict=True))
    found, unreadable = {}, {}
    for trial_id, (probabilities, reason) in outcomes.items():
        if reason is not None:
            unreadable[trial_id] = reason
        else:
            found[trial_id] = evaluation_set.predictions(probabilities)
    return Evaluations(found, unreadable)


def checkpoint_location(checkpoint: Path, experiment_location: str, local_dir: Path) -> str:
    """Where a worker reads ``checkpoint``: its URI on storage, or its local path.

    ``checkpoint`` is a folder under ``local_dir``, the local copy of the experiment dir
    at ``experiment_location``.
    """
    return joined(experiment_location, checkpoint.relative_to(local_dir).as_posix())


def evaluate_task(
    checkpoint: str, evaluation_set: Any
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """One checkpoint's val and test probabilities, or ``(None, why it cannot be read)``.

    Runs in a Ray worker, on its GPU when Ray gave it one.
    """
    import ray
    import torch

    from cxrtune.analysis.evaluation import evaluate_checkpoint, unreadable_reason
    from cxrtune.trainables.checkpoints import CheckpointCorruptError

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    with local_copy(checkpoint) as folder:
        try:
            return evaluate_checkpoint(folder, evaluation_set, device), None
        except CheckpointCorruptError as error:
            # Named by where it lives: a scratch copy is gone by the time anyone reads this.
            return None, unreadable_reason(error).replace(str(folder), redacted(checkpoint))
