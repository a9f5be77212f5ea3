"""The replay's trial: a Tune class trainable that reports a surrogate's curve.

Kept apart from ``search_efficiency`` so that a replay worker imports Ray Tune and
nothing more: the surrogate (scikit-learn, pandas) lives in one ``CurveServer``
actor that every trial asks for its curve. Starting a worker is most of what a
replayed trial costs, and a benchmark run starts hundreds.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import ray
from ray import tune

# How long a new trial worker waits for the rest of its search's workers (below).
START_TIMEOUT_S = 60.0


class StartLine:
    """Holds each search's first trials until all its trial workers are up.

    A replayed trial lasts milliseconds, while a new worker takes seconds to start.
    Left alone, Tune hands every next trial to the first worker that is up, and kills
    the others while they start, so that a search would run one trial at a time and
    start a doomed worker for most trials. A real trial outlasts a worker's start:
    held at the line, the replay runs its trials as many at a time as a sweep does.
    Run as an async Ray actor (``ray.remote(num_cpus=0)(StartLine)``).
    """

    def __init__(self) -> None:
        self.arrived: defaultdict[str, int] = defaultdict(int)
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def arrive(self, search: str, workers: int) -> bool:
        """Wait until ``workers`` workers of ``search`` have arrived; False on time-out."""
        self.arrived[search] += 1
        if self.arrived[search] >= workers:
            self.started[search].set()
        try:
            await asyncio.wait_for(self.started[search].wait(), START_TIMEOUT_S)
        except TimeoutError:
            return False
        return True


class ReplayTrial(tune.Trainable):
    """Reports one epoch of its config's curve per ``step``; the curve comes from ``curves``.

    A class trainable, not a function: a reused actor starts its next trial with a
    ``reset_config`` call instead of a new thread, and each epoch is one plain
    method call.
    """

    # ``tune.with_parameters`` adds ``curves`` (a ``CurveServer``) and ``start`` (a
    # ``StartLine``, the search's name and its number of trial workers) to Tune's
    # ``setup(config)``. ``setup`` runs once per worker, ``reset_config`` for each
    # later trial on it.
    def setup(  # type: ignore[override]
        self, config: dict[str, Any], curves: Any, start: tuple[Any, str, int]
    ) -> None:
        self.curves = curves
        self.curve = ray.get(curves.curve.remote(config))
        # Last, so that the search's workers all come up within a moment of each other.
        line, search, workers = start
        ray.get(line.arrive.remote(search, workers))

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self.curve = ray.get(self.curves.curve.remote(new_config))
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        return None  # nothing to save: the curve follows from the config

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None

    def step(self) -> dict[str, Any]:
        result = dict(self.curve[self.iteration])
        result["done"] = self.iteration + 1 == len(self.curve)
        return result


# In each replayed sweep checkpoint beside the model's files: the epochs completed, so
# that a trial restored from it (a resumed sweep) replays from the next epoch.
REPLAY_STATE = "replay.json"


def replay_sweep_trial(
    config: dict[str, Any],
    curves: tuple[str, str],
    checkpoint_files: dict[str, dict[str, bytes]],
    epoch_seconds: float,
) -> None:
    """A sweep's trial that replays its config's curve instead of training.

    Each epoch takes ``epoch_seconds`` (asleep: the GPU it stands for does the work)
    and reports the curve's validation metrics (from the ``CurveServer`` actor that
    ``curves``, a name and a namespace, finds: a handle would make every worker import
    the surrogate's module) with a real checkpoint, the files
    ``checkpoint_files`` holds for the trial's family: a small model the leaderboard
    can evaluate. Each result also says where the epoch ran: the node, the GPU ids Ray
    assigned, and when it started and ended, from which packing is measured.
    """
    import json
    import tempfile
    import time
    from pathlib import Path

    name, namespace = curves
    curve = ray.get(ray.get_actor(name, namespace=namespace).curve.remote(config))
    first = 0
    if checkpoint := tune.get_checkpoint():
        with checkpoint.as_directory() as directory:
            first = json.loads((Path(directory) / REPLAY_STATE).read_text())["epochs"]
    context = ray.get_runtime_context()
    placement = {
        "node_id": context.get_node_id(),
        "gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids()),
    }
    for index in range(first, len(curve)):
        started = time.time()
        time.sleep(epoch_seconds)
        with tempfile.TemporaryDirectory() as directory:
            for name, content in checkpoint_files[config["family"]].items():
                (Path(directory) / name).write_bytes(content)
            (Path(directory) / REPLAY_STATE).write_text(json.dumps({"epochs": index + 1}))
            result = {**curve[index], **placement, "epoch_started": started}
            tune.report(
                {**result, "epoch_ended": time.time()},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )
