"""Which checkpoints each trial keeps: its best few by the scheduler's metric, and its latest.

Ray's ``CheckpointConfig(num_to_keep=N)`` keeps the same ones, but forces a snapshot
of the whole experiment state each time a trial has checkpointed N times since the
last one. A snapshot serialises every trial of the sweep, so with one checkpoint per
epoch that is work in proportion to the trials for every epoch reported: in a
300-trial replayed sweep on a simulated cluster (``benchmarks/cluster_scale.py``)
it took half the driver's time, and it grows with the square of the trials. Here the
trial's older checkpoints are deleted by the driver as results arrive, and Ray
snapshots on its own schedule (about 5% of the driver's time).

A snapshot may then name a checkpoint deleted since; a trial resumed from it
continues from its newest checkpoint that reads (``newest_readable_state``).
"""

from __future__ import annotations

import logging
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from cxrtune.search.searcher import metric_mode

__all__ = ["CheckpointRetention", "checkpoints_to_delete"]

logger = logging.getLogger(__name__)


def checkpoints_to_delete(
    kept: list[tuple[float, int, str]], keep: int, mode: str
) -> list[tuple[float, int, str]]:
    """Of ``(score, index, name)`` checkpoints, those beyond the ``keep`` best and the latest.

    Later checkpoints win ties, as in the leaderboard's choice of epoch; a NaN score
    ranks last.
    """
    sign = -1.0 if mode == "min" else 1.0

    def rank(entry: tuple[float, int, str]) -> tuple[float, int]:
        score, index, _ = entry
        return (sign * score if math.isfinite(score) else -math.inf, index)

    best = sorted(kept, key=rank, reverse=True)[:keep]
    latest = max(kept, key=lambda entry: entry[1])
    return [entry for entry in kept if entry not in best and entry != latest]


@dataclass
class CheckpointRetention(tune.Callback):
    """Deletes a trial's checkpoints beyond its ``keep`` best by ``metric`` and its latest.

    A checkpoint is on storage by the time its result reaches the driver (Ray's
    trainables upload before they report), so the new one is never among those deleted.
    A checkpoint that cannot be deleted is a warning: it only takes space.
    """

    keep: int
    metric: str
    kept: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        name = result.get("checkpoint_dir_name")
        if not name:
            return
        score = result.get(self.metric)
        checkpoints = self.kept.setdefault(trial.trial_id, [])
        # Ray numbers a trial's checkpoint folders in order: checkpoint_000003.
        index = int(str(name).rpartition("_")[2])
        checkpoints.append((float(score) if score is not None else math.nan, index, str(name)))
        for entry in checkpoints_to_delete(checkpoints, self.keep, metric_mode(self.metric)):
            checkpoints.remove(entry)
            path = posixpath.join(trial.storage.trial_fs_path, entry[2])
            try:
                trial.storage.storage_filesystem.delete_dir(path)
            except OSError as error:
                logger.warning("could not delete the checkpoint %s: %s", path, error)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.kept.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.kept.pop(trial.trial_id, None)
