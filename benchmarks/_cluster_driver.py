"""``cxrtune`` with replayed trials: the driver of the cluster-scale benchmark.

``python -m benchmarks._cluster_driver sweep|resume ARGS`` runs the ``cxrtune``
command line with ARGS, as a user does on a cluster's head node, with one change:
each trial replays a recorded learning curve (``benchmarks._replay``) instead of
training. Everything else is the sweep's own: data preparation, the searcher, ASHA,
checkpoints, storage, the Optuna journal and the leaderboard. A replayed trial holds
no CUDA state, so its worker is reused for the next trial.

``python -m benchmarks._cluster_driver serve-curves ADDRESS`` starts the actor that
answers every trial's curve on the cluster at ADDRESS, once, before the sweep: it
outlives a killed driver, as the curves a resumed sweep replays must be the same.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Replayed epochs are this long (seconds); the benchmark sets it.
EPOCH_SECONDS_VARIABLE = "REPLAY_EPOCH_S"
CURVE_SERVER, REPLAY_NAMESPACE = "cluster-curves", "cxrtune-cluster-replay"


def checkpoint_files(config: Any, data: Any) -> dict[str, dict[str, bytes]]:
    """Per family, the files of a real checkpoint of an untrained model of that family.

    The model is built for the sweep's classes and image size, so the leaderboard can
    evaluate any replayed trial's checkpoint on the held-out split.
    """
    import torch

    from cxrtune.trainables.checkpoints import save_checkpoint
    from cxrtune.trainables.config import TrialConfig
    from cxrtune.trainables.models import create_model

    files = {}
    for family in config.families:
        trial = TrialConfig(family=family, lr=1e-3, batch_size=32, imbalance="none")
        model = create_model(trial, len(data.class_names), int(data.train_images.shape[-1]))
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                Path(directory),
                model=model,
                optimizer=torch.optim.Adam(model.parameters()),
                config=trial,
                epoch=1,
                generator=torch.Generator(),
                class_names=tuple(data.class_names),
                image_size=int(data.train_images.shape[-1]),
                metrics={},
            )
            files[family] = {path.name: path.read_bytes() for path in Path(directory).iterdir()}
    return files


def replay_trainable(config: Any, data: Any, pretrained: Any = None) -> Any:
    """Stands in for ``cxrtune.search.tuner.build_trainable``: same resources, replayed trials.

    The resource request is the sweep's own (``FamilyResourcesFn``), so the driver holds
    what a real sweep's driver holds of each trial's request.
    """
    from ray import tune

    from benchmarks._replay import replay_sweep_trial
    from cxrtune.search.resources import FamilyResourcesFn

    return tune.with_resources(
        tune.with_parameters(
            replay_sweep_trial,
            curves=(CURVE_SERVER, REPLAY_NAMESPACE),
            checkpoint_files=checkpoint_files(config, data),
            epoch_seconds=float(os.environ.get(EPOCH_SECONDS_VARIABLE, "0")),
        ),
        FamilyResourcesFn.for_sweep(config),
    )


def serve_curves(address: str) -> None:
    """Start the detached actor that serves the surrogate's curves on the cluster."""
    import ray

    from benchmarks._surrogate import fit_surrogate, read_table
    from benchmarks.search_efficiency import CurveServer

    ray.init(address=address, namespace=REPLAY_NAMESPACE, log_to_driver=False)
    server: Any = (
        ray.remote(num_cpus=0)(CurveServer)
        .options(name=CURVE_SERVER, lifetime="detached")
        .remote(fit_surrogate(read_table()))
    )
    ray.get(server.__ray_ready__.remote())


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve-curves"]:
        serve_curves(argv[1])
        return 0
    from cxrtune.search import cli, tuner

    tuner.build_trainable = replay_trainable
    tuner.REUSE_ACTORS = True
    return int(cli.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
