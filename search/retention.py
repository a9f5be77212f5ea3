"""What the sweep keeps of each trial: its best few checkpoints and its latest, on storage;
and, in the driver, none of Tune's metric and checkpoint records once the trial has ended,
with the memory they held given back to the system.

Ray's ``CheckpointConfig(num_to_keep=N)`` keeps the same ones, but forces a snapshot
of the whole experiment state each time a trial has checkpointed N times since the
last one. A snapshot serialises every trial of the sweep, so with one checkpoint per
epoch that is work in proportion to the trials for every epoch reported: in a
300-trial replayed sweep on a simulated cluster (``benchmarks/cluster_scale.py``)
it took half the driver's time, and it grows with the square of the trials. Here the
driver deletes a trial's older checkpoints itself, and Ray snapshots on its own
schedule (about 5% of the driver's time).

A checkpoint is deleted only once no snapshot a resume could read still names it as
its trial's latest: ``cxrtune resume`` restores each unfinished trial from the
checkpoint the snapshot on storage names, and Ray refuses one that is gone. The
snapshot's generation is this callback's own state, which Ray saves with each
snapshot (``get_state``) and uploads beside it; once storage holds a newer
generation than one seen there before, the upload that carried the earlier one has
finished, and checkpoints superseded before that earlier snapshot can go.
Deletion lags two or three snapshots (Ray snapshots every 10 s or more); a killed
driver leaves the checkpoints it had not deleted yet, which only take space.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import pickle
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray.util.debug
from ray import tune

from cxrtune.search.searcher import metric_mode

__all__ = [
    "CheckpointRetention",
    "ForgetEndedTrialHistory",
    "checkpoints_to_delete",
    "return_freed_memory",
]

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


# Ray's CallbackList saves the callbacks' states as callback-states-<session>.pkl.
CALLBACK_STATE_PREFIX, CALLBACK_STATE_SUFFIX = "callback-states-", ".pkl"

# Ray's ``TuneFunctionEncoder`` logs once for each object it falls back to pickling,
# under this prefix and the object's ``str``.
FALLBACK_LOG_KEY_PREFIX = "tune_func_encode:"

Doomed = tuple[Any, str]  # (storage filesystem, checkpoint path) of a checkpoint to delete


@dataclass
class CheckpointRetention(tune.Callback):
    """Deletes a trial's checkpoints beyond its ``keep`` best by ``metric`` and its latest.

    A checkpoint is on storage by the time its result reaches the driver (Ray's
    trainables upload before they report), so the new one is never among those deleted.
    Deletion waits until a snapshot on storage names a later one (see the module
    docstring). A checkpoint that cannot be deleted is a warning: it only takes space.
    """

    keep: int
    metric: str
    kept: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)
    # Superseded since the last snapshot; then keyed by the first snapshot that does not
    # name them.
    superseded: list[Doomed] = field(default_factory=list)
    covered: dict[int, list[Doomed]] = field(default_factory=dict)
    run: str = ""  # this driver's token in its snapshots: a resumed sweep gets a new one
    generation: int = 0  # snapshots taken by this driver
    seen_on_storage: int = 0  # the newest generation read back from storage
    experiment: tuple[Any, str] | None = None  # (filesystem, experiment path) of storage
    state_file: str | None = None  # this session's callback-states file on storage

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self.run = uuid.uuid4().hex
        self.generation = self.seen_on_storage = 0
        self.state_file = None

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        name = result.get("checkpoint_dir_name")
        if not name:
            return
        filesystem = trial.storage.storage_filesystem
        if self.experiment is None:
            self.experiment = (filesystem, trial.storage.experiment_fs_path)
        score = result.get(self.metric)
        checkpoints = self.kept.setdefault(trial.trial_id, [])
        # Ray numbers a trial's checkpoint folders in order: checkpoint_000003.
        index = int(str(name).rpartition("_")[2])
        checkpoints.append((float(score) if score is not None else math.nan, index, str(name)))
        for entry in checkpoints_to_delete(checkpoints, self.keep, metric_mode(self.metric)):
            checkpoints.remove(entry)
            self.superseded.append(
                (filesystem, posixpath.join(trial.storage.trial_fs_path, entry[2]))
            )

    def get_state(self) -> dict[str, Any]:
        """Called as Ray writes a snapshot: it names no checkpoint superseded before now."""
        self.generation += 1
        if self.superseded:
            self.covered[self.generation] = self.superseded
            self.superseded = []
        self.delete_what_storage_no_longer_names()
        return {"run": self.run, "generation": self.generation}

    def set_state(self, state: dict[str, Any]) -> None:
        """A resumed sweep's retention starts afresh: the earlier driver's state is not its own."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.kept.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.kept.pop(trial.trial_id, None)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Delete the rest once every trial has ended.

        Ray calls this after it waited for the final snapshot's upload, except when
        the sweep broke off with an error: then trials are left unfinished, and their
        superseded checkpoints stay.
        """
        if all(trial.status in ("TERMINATED", "ERROR") for trial in trials):
            for doomed in self.covered.values():
                delete(doomed)
            delete(self.superseded)
            self.covered, self.superseded = {}, []

    def delete_what_storage_no_longer_names(self) -> None:
        if not self.covered:
            return
        on_storage = self.generation_on_storage()
        if on_storage <= self.seen_on_storage:
            return
        # The upload that carried ``seen_on_storage`` has finished: uploads run one at a
        # time, and a later one has started.
        safe, self.seen_on_storage = self.seen_on_storage, on_storage
        for generation in [key for key in self.covered if key <= safe]:
            delete(self.covered.pop(generation))

    def generation_on_storage(self) -> int:
        """The newest generation of this run in the callback states on storage; 0 if none."""
        if self.experiment is None:
            return 0
        import pyarrow.fs

        filesystem, experiment_path = self.experiment
        try:
            if self.state_file is None:
                listing = filesystem.get_file_info(pyarrow.fs.FileSelector(experiment_path))
                candidates = [
                    info.path
                    for info in listing
                    if info.base_name.startswith(CALLBACK_STATE_PREFIX)
                    and info.base_name.endswith(CALLBACK_STATE_SUFFIX)
                ]
            else:
                candidates = [self.state_file]
            for path in candidates:
                with filesystem.open_input_stream(path) as stream:
                    states = pickle.loads(stream.read())
                for state in states.values():
                    if isinstance(state, dict) and state.get("run") == self.run:
                        self.state_file = path
                        return int(state["generation"])
        except (OSError, pickle.UnpicklingError, EOFError) as error:
            logger.warning("could not read the snapshot state on storage: %s", error)
        return 0


def delete(doomed: list[Doomed]) -> None:
    for filesystem, path in doomed:
        try:
            filesystem.delete_dir(path)
        except OSError as error:
            logger.warning("could not delete the checkpoint %s: %s", path, error)


class ForgetEndedTrialHistory(tune.Callback):
    """Drops what Ray Tune keeps in the driver of each ended trial's metrics and checkpoints.

    For every trial, Tune keeps the min, max, mean and last-5 and last-10 means of
    each numeric key it has reported (about 2 KB per key) and a record of each
    checkpoint it reported, and writes both into every snapshot of the experiment
    state. Ended trials stay in the driver until the sweep ends, so this grows with the
    trials: 60 of the 69 KB a six-epoch ended trial held, modelled on the replayed
    sweep of ``benchmarks/cluster_scale.py``, and a resumed driver reads it all back.
    Nothing in cxrtune reads either: results and checkpoints are read from the trials'
    folders, and a resumed sweep does not run ended trials again. The trial's last
    result stays.

    Both live in ``trial.run_metadata``, which Tune offers no public way to trim.
    Should a later Ray change it, this warns once and leaves trials as they are.

    Each snapshot also leaves keys in Ray's log-once record, one for each object
    Tune's JSON encoder has to pickle, named by what the object holds: a trial's
    storage context and checkpoint record, and its metrics' last-5 and last-10
    values, new at almost every snapshot of a running trial. Nothing removes them (about
    1.6 KB a trial); they are dropped after each snapshot. Ray offers no public way
    to drop only these, so this reads its record, ``ray.util.debug._logged``. After
    each snapshot the driver also gives the memory it freed back to the system
    (``return_freed_memory``).
    """

    def __init__(self) -> None:
        self.restored_trials_seen = False
        self.warned = False

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not self.restored_trials_seen:
            # A resumed sweep restores the trials that had ended before, history and all.
            self.restored_trials_seen = True
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self.forget(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.forget(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.forget(trial)

    def get_state(self) -> None:
        """Called as Ray writes a snapshot, after it wrote every trial into it."""
        logged = getattr(ray.util.debug, "_logged", None)
        if isinstance(logged, set):
            logged.difference_update(
                [key for key in logged if str(key).startswith(FALLBACK_LOG_KEY_PREFIX)]
            )
        return_freed_memory()

    def forget(self, trial: Any) -> None:
        metadata: Any = getattr(trial, "run_metadata", None)
        try:
            checkpoints = metadata.checkpoint_manager
            # An empty record of the same kind, as Tune makes for a new trial. Assigned,
            # not cleared in place: assigning also drops the JSON Tune cached of the
            # metadata, so the next snapshot writes the trimmed one.
            empty = type(checkpoints)(checkpoints.checkpoint_config) if checkpoints else None
            metadata.metric_analysis, metadata.metric_n_steps = {}, {}
            if empty is not None:
                metadata.checkpoint_manager = empty
        except (AttributeError, TypeError) as error:
            if not self.warned:
                self.warned = True
                logger.warning(
                    "ended trials keep their metric and checkpoint history in the driver: "
                    "this Ray keeps it where cxrtune does not look (%s)",
                    error,
                )


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system, where the C library can (glibc).

    Python hands each object of over 512 bytes to the C allocator: every result the
    driver reads, every trial's snapshot JSON, a restored experiment's state. What is
    freed between live ones stays in the process, counted in its memory, until trimmed.
    """
    trim = malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None under a C library without one."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
