"""Each trial keeps its best checkpoints and its latest; the driver deletes the rest."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs
import pytest

from cxrtune.search.retention import (
    CheckpointRetention,
    ForgetEndedTrialHistory,
    checkpoints_to_delete,
    malloc_trim,
    return_freed_memory,
)


def names(entries: list[tuple[float, int, str]]) -> list[str]:
    return [name for _, _, name in entries]


def test_the_best_few_and_the_latest_are_kept() -> None:
    kept = [(0.7, 0, "c0"), (0.9, 1, "c1"), (0.8, 2, "c2"), (0.6, 3, "c3")]
    assert names(checkpoints_to_delete(kept, keep=2, mode="max")) == ["c0"]
    assert names(checkpoints_to_delete(kept, keep=1, mode="max")) == ["c0", "c2"]
    assert names(checkpoints_to_delete(kept, keep=1, mode="min")) == ["c0", "c1", "c2"]


def test_later_checkpoints_win_ties_and_nan_ranks_last() -> None:
    kept = [(0.9, 0, "c0"), (0.9, 1, "c1"), (math.nan, 2, "c2"), (0.5, 3, "c3")]
    assert names(checkpoints_to_delete(kept, keep=1, mode="max")) == ["c0", "c2"]


def make_trial(experiment: Path, trial_id: str = "t1", filesystem: Any = None) -> Any:
    storage = SimpleNamespace(
        experiment_fs_path=str(experiment),
        trial_fs_path=str(experiment / trial_id),
        storage_filesystem=filesystem or pyarrow.fs.LocalFileSystem(),
    )
    return SimpleNamespace(trial_id=trial_id, storage=storage, status="RUNNING")


def report(retention: CheckpointRetention, trial: Any, index: int, score: float) -> None:
    """A result with a new checkpoint, written to the trial's folder first, as Ray does."""
    name = f"checkpoint_{index:06d}"
    folder = Path(trial.storage.trial_fs_path) / name
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"state")
    retention.on_trial_result(0, [], trial, {"val_macro_auc": score, "checkpoint_dir_name": name})


def snapshot(retention: CheckpointRetention, experiment: Path, *, uploaded: bool = True) -> None:
    """What Ray does at a snapshot: take the callbacks' states, then upload them to storage."""
    state = retention.get_state()
    if uploaded:
        (experiment / "callback-states-session.pkl").write_bytes(pickle.dumps({0: state}))


def on_disk(trial: Any) -> list[str]:
    return sorted(path.name for path in Path(trial.storage.trial_fs_path).iterdir())


@pytest.mark.parametrize("keep", [1, 2])
def test_the_callback_deletes_a_trials_other_checkpoints_once_storage_no_longer_names_them(
    tmp_path: Path, keep: int
) -> None:
    trial = make_trial(tmp_path)
    retention = CheckpointRetention(keep, "val_macro_auc")
    retention.setup()
    for index, score in enumerate([0.6, 0.9, 0.7, 0.8, 0.5]):
        report(retention, trial, index, score)
    retention.on_trial_result(0, [], trial, {"val_macro_auc": 0.99})  # no checkpoint: ignored
    every = [f"checkpoint_{index:06d}" for index in range(5)]
    assert on_disk(trial) == every  # the snapshot on storage may name any of them

    snapshot(retention, tmp_path)  # generation 1 names checkpoint 4 as the latest
    snapshot(retention, tmp_path)  # storage shows 1; its upload may still be running
    assert on_disk(trial) == every
    snapshot(retention, tmp_path)  # storage shows 2: the upload of 1 has finished

    best = {1: ["checkpoint_000001"], 2: ["checkpoint_000001", "checkpoint_000003"]}[keep]
    assert on_disk(trial) == sorted([*best, "checkpoint_000004"])


def test_a_snapshot_storage_never_received_deletes_nothing(tmp_path: Path) -> None:
    trial = make_trial(tmp_path)
    retention = CheckpointRetention(1, "val_macro_auc")
    retention.setup()
    for index, score in enumerate([0.9, 0.5, 0.4]):
        report(retention, trial, index, score)
    for _ in range(3):  # Ray skipped these uploads: the one before was still running
        snapshot(retention, tmp_path, uploaded=False)
    assert len(on_disk(trial)) == 3
    snapshot(retention, tmp_path)
    snapshot(retention, tmp_path)
    snapshot(retention, tmp_path)
    assert on_disk(trial) == ["checkpoint_000000", "checkpoint_000002"]


def test_an_earlier_drivers_snapshots_do_not_count_for_a_resumed_one(tmp_path: Path) -> None:
    trial = make_trial(tmp_path)
    earlier = CheckpointRetention(1, "val_macro_auc")
    earlier.setup()
    for _ in range(5):
        snapshot(earlier, tmp_path)  # generation 5 of the killed driver is on storage
    resumed = CheckpointRetention(1, "val_macro_auc")
    resumed.setup()
    resumed.set_state(earlier.get_state())  # Ray hands back the old state; it is not ours
    for index, score in enumerate([0.9, 0.5, 0.4]):
        report(resumed, trial, index, score)
    resumed.get_state()
    resumed.get_state()  # nothing of this driver on storage yet
    assert len(on_disk(trial)) == 3


def test_every_superseded_checkpoint_goes_when_all_trials_ended(tmp_path: Path) -> None:
    trial = make_trial(tmp_path)
    retention = CheckpointRetention(1, "val_macro_auc")
    retention.setup()
    for index, score in enumerate([0.9, 0.5]):
        report(retention, trial, index, score)
    snapshot(retention, tmp_path)
    report(retention, trial, 2, 0.4)
    retention.on_experiment_end(trials=[trial])  # a broken-off sweep: one still running
    assert len(on_disk(trial)) == 3
    trial.status = "TERMINATED"
    retention.on_experiment_end(trials=[trial])
    assert on_disk(trial) == ["checkpoint_000000", "checkpoint_000002"]


def test_a_checkpoint_that_cannot_be_deleted_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Refusing:
        def delete_dir(self, path: str) -> None:
            raise PermissionError(f"read-only: {path}")

    trial = make_trial(tmp_path, filesystem=Refusing())
    retention = CheckpointRetention(1, "val_macro_auc")
    retention.setup()
    for index, score in enumerate([0.9, 0.5, 0.4]):
        report(retention, trial, index, score)
    trial.status = "TERMINATED"
    retention.on_experiment_end(trials=[trial])
    assert "could not delete the checkpoint" in caplog.text
    assert "checkpoint_000001" in caplog.text


def tune_trial(trial_id: str, epochs: int) -> Any:
    """A Ray Tune trial as the driver holds it after ``epochs`` results, each with a checkpoint."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune.experiment import Trial

    trial = Trial("replay", config={"family": "baseline_cnn", "lr": 1e-3}, stub=True)
    trial.trial_id = trial_id
    config = tune.CheckpointConfig(checkpoint_score_attribute="val_macro_auc")
    trial.run_metadata.checkpoint_manager = _CheckpointManager(config)
    for epoch in range(1, epochs + 1):
        result = {"epoch": epoch, "val_macro_auc": 0.5 + epoch / 100, "training_iteration": epoch}
        trial.update_last_result(result)
        checkpoint = tune.Checkpoint(f"/experiment/{trial_id}/checkpoint_{epoch:06d}")
        trial.run_metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=checkpoint, metrics=result)
        )
    return trial


def test_ended_trials_lose_their_metric_and_checkpoint_history_and_running_ones_keep_it() -> None:
    from ray.tune.experiment import Trial

    ended, running, restored = (tune_trial(name, 3) for name in ("ended", "running", "restored"))
    restored.set_status(Trial.TERMINATED)
    running.set_status(Trial.RUNNING)
    full_json = ended.get_json_state()[1]
    forget = ForgetEndedTrialHistory()
    # A resumed driver's first step: the trials that ended before it died.
    forget.on_step_begin(0, [restored, running])
    forget.on_trial_complete(0, [ended, running], ended)

    for trial in (ended, restored):
        assert trial.metric_analysis == {} and trial.metric_n_steps == {}
        assert trial.checkpoint is None
        assert trial.run_metadata.checkpoint_manager.checkpoint_config.checkpoint_score_attribute
        assert trial.last_result["val_macro_auc"] == pytest.approx(0.53)
    assert running.metric_analysis["val_macro_auc"]["max"] == pytest.approx(0.53)
    assert running.checkpoint.path.endswith("checkpoint_000003")
    # The snapshot carries the trimmed state, and Tune restores from it.
    trimmed_json = ended.get_json_state()[1]
    assert len(trimmed_json) < len(full_json) / 2
    again = tune_trial("again", 0)
    again.restore_run_metadata(trimmed_json)
    assert again.last_result["epoch"] == 3 and again.metric_analysis == {}
    assert again.checkpoint is None


def test_a_ray_without_the_history_gets_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forget = ForgetEndedTrialHistory()
    for name in ("a", "b"):
        forget.on_trial_error(0, [], SimpleNamespace(trial_id=name, run_metadata=object()))
    warnings = [record for record in caplog.records if "history" in record.getMessage()]
    assert len(warnings) == 1


def test_ended_trials_leave_no_log_once_keys_behind(tmp_path: Path) -> None:
    """Tune's JSON encoder keeps a log-once key per object it pickles, named by the trial.

    Ray offers no count of those keys but its record, ``ray.util.debug._logged``.
    """
    from ray.train._internal.storage import StorageContext
    from ray.util import debug

    trials = [tune_trial(f"t{index}", 2) for index in range(10)]
    for trial in trials:
        trial.storage = StorageContext(
            storage_path=str(tmp_path), experiment_dir_name="sweep", trial_dir_name=trial.trial_id
        )
    forget = ForgetEndedTrialHistory()
    before = set(debug._logged)
    for trial in trials:
        trial.get_json_state()  # a snapshot while the trial runs
        forget.on_trial_complete(0, trials, trial)
        trial.get_json_state()  # the first snapshot after it ended
    assert len(set(debug._logged) - before) >= 2 * len(trials)
    forget.get_state()  # called as that snapshot is written: the keys go
    assert set(debug._logged) - before == set()


def resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmRSS")]
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(malloc_trim() is None, reason="a C library without malloc_trim")
def test_memory_freed_below_live_objects_goes_back_to_the_system() -> None:
    """What ``free`` keeps: 200 MB freed beneath a live object, as results are in a driver."""
    blocks = [bytes(2048) for _ in range(100_000)]  # each over Python's 512-byte pools
    live = bytes(2048)  # above them on the heap: free() alone cannot shrink it
    del blocks
    before = resident_bytes()
    return_freed_memory()
    assert before - resident_bytes() > 100e6
    assert len(live) == 2048
