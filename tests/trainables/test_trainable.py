from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray import tune

from cxrtune.trainables import trainable
from cxrtune.trainables.checkpoints import read_checkpoint
from cxrtune.trainables.trainable import TrialData, train_trial

CONFIG = {
    "family": "regularized_cnn",
    "lr": 2e-3,
    "batch_size": 16,
    "imbalance": "oversample",
    "dropout": 0.3,
    "weight_decay": 1e-4,
    "augment_strength": 0.5,
    "max_epochs": 3,
    "seed": 7,
}


def tiny_data() -> TrialData:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [8, 20, 20])
    images = rng.integers(0, 256, (48, 1, 16, 16), dtype=np.uint8)
    images[labels == 0, :, 4:8, 4:8] = 255
    images.flags.writeable = False  # as arrays arrive from Ray's object store
    return TrialData(
        train_images=images[:36],
        train_labels=labels[:36],
        val_images=images[36:],
        val_labels=np.array([0, 1, 2] * 4),
        class_names=("COVID", "Normal", "Pneumonia"),
        positive_index=0,
    )


class FakeTune:
    """Stands in for Ray Tune's session: hands out a checkpoint, records reports."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, keep: Path, resume_from: Path | None):
        self.reports: list[dict[str, Any]] = []
        self.keep = keep
        monkeypatch.setattr(tune, "report", self.report)
        restored = tune.Checkpoint.from_directory(resume_from) if resume_from else None
        monkeypatch.setattr(tune, "get_checkpoint", lambda: restored)
        monkeypatch.setattr(trainable, "assigned_resources", lambda: (1, torch.device("cpu")))

    def report(self, metrics: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
        self.reports.append(metrics)
        shutil.copytree(checkpoint.path, self.keep / f"epoch{metrics['epoch']}")


def test_every_epoch_reports_the_documented_keys_and_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = FakeTune(monkeypatch, tmp_path, resume_from=None)
    train_trial(dict(CONFIG), tiny_data())
    assert [r["epoch"] for r in session.reports] == [1, 2, 3]
    expected = {
        "epoch",
        "epoch_time_s",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_covid_recall",
        "val_covid_precision",
        "val_macro_auc",
        "val_auc_covid",
        "val_auc_normal",
        "val_auc_pneumonia",
    }
    assert set(session.reports[0]) == expected
    state = read_checkpoint(tmp_path / "epoch3")
    assert state["epoch"] == 3 and state["trial_config"]["seed"] == 7


def test_a_resumed_trial_continues_exactly_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uninterrupted = FakeTune(monkeypatch, tmp_path / "full", resume_from=None)
    (tmp_path / "full").mkdir()
    train_trial(dict(CONFIG), tiny_data())

    (tmp_path / "resumed").mkdir()
    resumed = FakeTune(monkeypatch, tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch1")
    train_trial(dict(CONFIG), tiny_data())

    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    for after_resume, original in zip(resumed.reports, uninterrupted.reports[1:], strict=True):
        assert after_resume["train_loss"] == original["train_loss"]
        assert after_resume["val_macro_auc"] == original["val_macro_auc"]


def test_an_unknown_config_key_fails_the_trial_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = FakeTune(monkeypatch, tmp_path, resume_from=None)
    with pytest.raises(ValueError, match="drop_out"):
        train_trial({**CONFIG, "drop_out": 0.1}, tiny_data())
    assert session.reports == []
