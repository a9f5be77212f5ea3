from __future__ import annotations

import gc
import shutil
import weakref
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


# What a trial on the classes covid, normal and pneumonia reports every epoch, whichever way
# it trains (one process or data-parallel workers).
TRIAL_METRIC_KEYS = {
    "epoch",
    "epoch_time_s",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_covid_recall",
    "val_covid_recall_at_spec",
    "val_covid_precision",
    "val_macro_auc",
    "val_auc_covid",
    "val_auc_normal",
    "val_auc_pneumonia",
    "precision",
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
        assigned = trainable.AssignedResources(1, torch.device("cpu"), 0.0)
        monkeypatch.setattr(trainable, "assigned_resources", lambda: assigned)

    def report(self, metrics: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
        self.reports.append(metrics)
        shutil.copytree(checkpoint.path, self.keep / f"epoch{metrics['epoch']}")


def test_every_epoch_reports_the_documented_keys_and_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = FakeTune(monkeypatch, tmp_path, resume_from=None)
    train_trial(dict(CONFIG), tiny_data())
    assert [r["epoch"] for r in session.reports] == [1, 2, 3]
    assert set(session.reports[0]) == TRIAL_METRIC_KEYS
    assert session.reports[0]["precision"] == "fp32"  # a CPU trains in float32
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


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_trial_given_a_gpu_waits_for_the_memory_a_stopped_trial_still_holds() -> None:
    clock = FakeClock()
    total = 80 * 2**30
    # The stopped trial's process lets go of its memory after 6 s.
    free = lambda: (total if clock.now >= 6 else total // 10, total)  # noqa: E731
    started = trainable.wait_for_device_memory(
        1.0, free, timeout_s=60, poll_s=2, sleep=clock.sleep, clock=lambda: clock.now
    )
    assert started and clock.now == 6


def test_a_quarter_gpu_trial_starts_beside_neighbours_that_leave_it_a_quarter() -> None:
    clock = FakeClock()
    total = 80 * 2**30
    started = trainable.wait_for_device_memory(
        0.25,
        lambda: (total // 4, total),
        timeout_s=60,
        sleep=clock.sleep,
        clock=lambda: clock.now,
    )
    assert started and clock.now == 0


def test_the_wait_for_gpu_memory_gives_up_after_its_timeout_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    total = 16 * 2**30
    started = trainable.wait_for_device_memory(
        1.0, lambda: (0, total), timeout_s=10, poll_s=2, sleep=clock.sleep, clock=lambda: clock.now
    )
    assert not started and clock.now == 10
    assert "GPU memory free" in caplog.text


def test_a_failed_trial_lets_go_of_its_model_before_its_error_is_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeTune(monkeypatch, tmp_path, resume_from=None)
    models: list[weakref.ref[torch.nn.Module]] = []
    real_create_model = trainable.create_model

    def create_model(*args: Any) -> torch.nn.Module:
        model = real_create_model(*args)
        models.append(weakref.ref(model))
        return model

    def fail(*args: Any, **kwargs: Any) -> float:
        raise RuntimeError("CUDA out of memory")

    released: list[torch.device] = []
    monkeypatch.setattr(trainable, "create_model", create_model)
    monkeypatch.setattr(trainable, "train_one_epoch", fail)
    monkeypatch.setattr(trainable, "release_device_memory", released.append)
    with pytest.raises(RuntimeError, match="out of memory") as error:
        train_trial(dict(CONFIG), tiny_data())
    # The error and its traceback are still alive here, as they are while Ray
    # handles them, yet the model is gone.
    gc.collect()
    assert error.value.__traceback__ is not None
    assert len(models) == 1 and models[0]() is None
    assert released == [torch.device("cpu")]
