"""Each trial keeps its best checkpoints and its latest; the driver deletes the rest."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from cxrtune.search.retention import CheckpointRetention, checkpoints_to_delete


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


@pytest.mark.parametrize("keep", [1, 2])
def test_the_callback_deletes_a_trials_other_checkpoints_from_storage(
    tmp_path: Path, keep: int
) -> None:
    trial_dir = tmp_path / "trial"
    storage = SimpleNamespace(
        trial_fs_path=str(trial_dir), storage_filesystem=pyarrow.fs.LocalFileSystem()
    )
    trial = SimpleNamespace(trial_id="t1", storage=storage)
    retention = CheckpointRetention(keep, "val_macro_auc")
    scores = [0.6, 0.9, 0.7, 0.8, 0.5]
    for index, score in enumerate(scores):
        name = f"checkpoint_{index:06d}"
        (trial_dir / name).mkdir(parents=True)
        (trial_dir / name / "checkpoint.pt").write_bytes(b"state")
        result = {"val_macro_auc": score, "checkpoint_dir_name": name}
        retention.on_trial_result(0, [], trial, result)
    retention.on_trial_result(0, [], trial, {"val_macro_auc": 0.99})  # no checkpoint: ignored

    on_disk = sorted(path.name for path in trial_dir.iterdir())
    best = {1: ["checkpoint_000001"], 2: ["checkpoint_000001", "checkpoint_000003"]}[keep]
    assert on_disk == sorted([*best, "checkpoint_000004"])


def test_a_checkpoint_that_cannot_be_deleted_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class ReadOnly:
        def delete_dir(self, path: str) -> None:
            raise PermissionError(f"read-only: {path}")

    storage = SimpleNamespace(trial_fs_path=str(tmp_path), storage_filesystem=ReadOnly())
    trial = SimpleNamespace(trial_id="t1", storage=storage)
    retention = CheckpointRetention(1, "val_macro_auc")
    for index, score in enumerate([0.9, 0.5, 0.4]):
        result = {"val_macro_auc": score, "checkpoint_dir_name": f"checkpoint_{index:06d}"}
        retention.on_trial_result(0, [], trial, result)
    assert "could not delete the checkpoint" in caplog.text
    assert "checkpoint_000001" in caplog.text
