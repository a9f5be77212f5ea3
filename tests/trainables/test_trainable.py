from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from ray import tune

from cxrtune.trainables import devices, fit, trainable
from cxrtune.trainables.checkpoints import read_checkpoint
from cxrtune.trainables.engine import NonFiniteLossError
from cxrtune.trainables.failures import TRIAL_ERROR_KEY
from cxrtune.trainables.fit import TrialData
from cxrtune.trainables.trainable import train_trial

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


def tiny_data(size: int = 16) -> TrialData:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [8, 20, 20])
    images = rng.integers(0, 256, (48, 1, size, size), dtype=np.uint8)
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
        assigned = devices.AssignedResources(1, torch.device("cpu"), 0.0)
        monkeypatch.setattr(trainable, "assigned_resources", lambda: assigned)

    def report(self, metrics: dict[str, Any], checkpoint: tune.Checkpoint | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None:
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_resumed_fp16_trial_on_a_gpu_continues_exactly_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9: dropout's CUDA generator and the GradScaler's scale come back on resume."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    # fp16 (not the bf16 a recent GPU gets) so that the trial has a GradScaler.
    monkeypatch.setattr(fit, "choose_precision", lambda device: "fp16")
    gpu = devices.AssignedResources(1, torch.device("cuda"), 1.0)

    (tmp_path / "full").mkdir()
    uninterrupted = FakeTune(monkeypatch, tmp_path / "full", resume_from=None)
    monkeypatch.setattr(trainable, "assigned_resources", lambda: gpu)
    train_trial(dict(CONFIG), tiny_data())

    (tmp_path / "resumed").mkdir()
    resumed = FakeTune(monkeypatch, tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch1")
    monkeypatch.setattr(trainable, "assigned_resources", lambda: gpu)
    train_trial(dict(CONFIG), tiny_data())

    assert [r["precision"] for r in uninterrupted.reports] == ["fp16"] * 3
    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    for after_resume, original in zip(resumed.reports, uninterrupted.reports[1:], strict=True):
        assert after_resume["train_loss"] == original["train_loss"]
        assert after_resume["val_macro_auc"] == original["val_macro_auc"]
    full, again = (
        read_checkpoint(tmp_path / "full" / "epoch3"),
        read_checkpoint(tmp_path / "resumed" / "epoch3"),
    )
    assert again["grad_scaler"] == full["grad_scaler"]
    assert torch.equal(again["cuda_rng"], full["cuda_rng"])


def test_an_unknown_config_key_ends_the_trial_with_its_error_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = FakeTune(monkeypatch, tmp_path, resume_from=None)
    train_trial({**CONFIG, "drop_out": 0.1}, tiny_data())
    [report] = session.reports
    assert set(report) == {TRIAL_ERROR_KEY}
    assert (
        report[TRIAL_ERROR_KEY].startswith("ConfigError:") and "drop_out" in report[TRIAL_ERROR_KEY]
    )


def test_a_non_finite_loss_ends_the_trial_with_its_error_after_the_epochs_it_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 8: the trial returns (Tune will not retry it) with a last result holding the error."""
    session = FakeTune(monkeypatch, tmp_path, resume_from=None)
    real_train_one_epoch = fit.train_one_epoch

    def diverge_in_epoch_two(*args: Any, **kwargs: Any) -> float:
        if len(session.reports) == 1:
            raise NonFiniteLossError("training loss became nan at step 3")
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(fit, "train_one_epoch", diverge_in_epoch_two)
    train_trial(dict(CONFIG), tiny_data())
    assert [report.get("epoch") for report in session.reports] == [1, None]
    assert session.reports[1] == {
        TRIAL_ERROR_KEY: "NonFiniteLossError: training loss became nan at step 3"
    }


def test_a_vgg16_trial_trains_from_the_state_dict_it_is_handed_not_from_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1: the weights path in the config exists only on the driver's machine."""
    FakeTune(monkeypatch, tmp_path, resume_from=None)
    torch.manual_seed(3)
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    config = {
        **CONFIG,
        "family": "vgg16",
        "finetune_blocks": 1,
        "max_epochs": 1,
        "weights": str(tmp_path / "never-written" / "vgg16.pt"),
    }
    train_trial(config, tiny_data(size=32), pretrained=features)
    state = read_checkpoint(tmp_path / "epoch1")
    # The first block stays frozen, so its conv holds the handed weights, RGB summed.
    expected = features["0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(state["model"]["frozen.0.weight"], expected)
    assert state["trial_config"]["weights"] == config["weights"]


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
    started = devices.wait_for_device_memory(
        1.0, free, timeout_s=60, poll_s=2, sleep=clock.sleep, clock=lambda: clock.now
    )
    assert started and clock.now == 6


def test_a_quarter_gpu_trial_starts_beside_neighbours_that_leave_it_a_quarter() -> None:
    clock = FakeClock()
    total = 80 * 2**30
    started = devices.wait_for_device_memory(
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
    started = devices.wait_for_device_memory(
        1.0, lambda: (0, total), timeout_s=10, poll_s=2, sleep=clock.sleep, clock=lambda: clock.now
    )
    assert not started and clock.now == 10
    assert "GPU memory free" in caplog.text


def test_a_failed_trial_lets_go_of_its_model_before_its_error_is_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeTune(monkeypatch, tmp_path, resume_from=None)
    models: list[weakref.ref[torch.nn.Module]] = []
    real_create_model = fit.create_model

    def create_model(*args: Any) -> torch.nn.Module:
        model = real_create_model(*args)
        models.append(weakref.ref(model))
        return model

    def fail(*args: Any, **kwargs: Any) -> float:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    released: list[torch.device] = []
    monkeypatch.setattr(fit, "create_model", create_model)
    monkeypatch.setattr(fit, "train_one_epoch", fail)
    monkeypatch.setattr(trainable, "release_device_memory", released.append)
    # An out-of-memory error may not recur (a neighbour held the memory): it
    # propagates, for Tune to retry the trial.
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory") as error:
        train_trial(dict(CONFIG), tiny_data())
    # The error and its traceback are still alive here, as they are while Ray
    # handles them, yet the model is gone.
    gc.collect()
    assert error.value.__traceback__ is not None
    assert len(models) == 1 and models[0]() is None
    assert released == [torch.device("cpu")]
