from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torchvision

from cxrtune.trainables.checkpoints import (
    CHECKSUM_FILE,
    CheckpointCorruptError,
    model_from_checkpoint,
    newest_readable_state,
    read_checkpoint,
    save_checkpoint,
)
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.models import create_model, read_vgg16_weights


def test_a_checkpoint_rebuilds_the_same_model_without_the_pretrained_file(tmp_path: Path) -> None:
    weights = tmp_path / "vgg16.pt"
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), weights)
    config = TrialConfig(
        family="vgg16",
        lr=1e-4,
        batch_size=8,
        imbalance="none",
        finetune_blocks=1,
        weights=str(weights),
    )
    model = create_model(
        config, num_classes=3, image_size=32, pretrained=read_vgg16_weights(str(weights))
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    directory = tmp_path / "checkpoint_000001"
    directory.mkdir()
    save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        config=config,
        epoch=3,
        generator=torch.Generator().manual_seed(1),
        class_names=("A", "B", "C"),
        image_size=32,
        metrics={"val_macro_auc": 0.75},
    )
    weights.unlink()  # the copy a user moves elsewhere has no access to the original file

    restored, restored_config, state = model_from_checkpoint(directory)
    assert restored_config == config
    assert state["epoch"] == 3 and state["class_names"] == ["A", "B", "C"]
    images = torch.randn(2, 1, 32, 32)
    model.eval()
    assert torch.allclose(restored(images), model(images))
    assert read_checkpoint(directory / "checkpoint.pt")["metrics"] == {"val_macro_auc": 0.75}


def write_epoch_checkpoint(directory: Path, epoch: int) -> Path:
    """A baseline_cnn checkpoint of ``epoch`` in ``directory`` (created)."""
    config = TrialConfig(family="baseline_cnn", lr=1e-3, batch_size=8, imbalance="none")
    model = create_model(config, num_classes=2, image_size=16)
    directory.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(
        directory,
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        config=config,
        epoch=epoch,
        generator=torch.Generator().manual_seed(0),
        class_names=("A", "B"),
        image_size=16,
        metrics={"epoch": epoch},
    )


def test_a_checkpoint_is_written_with_its_checksum_and_no_partial_file(tmp_path: Path) -> None:
    path = write_epoch_checkpoint(tmp_path, epoch=1)
    digest, name = (tmp_path / CHECKSUM_FILE).read_text().split()
    assert name == "checkpoint.pt"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.sha256"]


def test_a_failed_save_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_epoch_checkpoint(tmp_path, epoch=1)

    def disk_full(descriptor: int) -> None:
        # The new file's bytes are handed to the OS; flushing them to disk fails.
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_epoch_checkpoint(tmp_path, epoch=2)
    assert read_checkpoint(tmp_path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.sha256"]


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    path = write_epoch_checkpoint(tmp_path, epoch=1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointCorruptError, match="does not match its checksum"):
        read_checkpoint(tmp_path)
    (tmp_path / CHECKSUM_FILE).unlink()  # as in a checkpoint written before checksums
    with pytest.raises(CheckpointCorruptError, match="cannot be read"):
        read_checkpoint(tmp_path)


def test_a_damaged_byte_of_the_same_length_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = write_epoch_checkpoint(tmp_path, epoch=1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=str(path)):
        read_checkpoint(path)


def test_a_missing_checkpoint_file_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointCorruptError, match="missing"):
        read_checkpoint(tmp_path)


def test_resuming_falls_back_to_the_newest_earlier_readable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.tune import Checkpoint

    for index in range(4):  # epochs 1..4 in checkpoint_000000..checkpoint_000003
        write_epoch_checkpoint(tmp_path / f"checkpoint_{index:06d}", epoch=index + 1)
    (tmp_path / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "checkpoint_000002" / "checkpoint.pt").unlink()
    registered = Checkpoint.from_directory(tmp_path / "checkpoint_000002")

    state = newest_readable_state(registered)

    assert state["epoch"] == 1  # not epoch 4: Ray never registered checkpoint_000003
    skipped = capsys.readouterr().err
    assert "checkpoint_000002" in skipped and "checkpoint_000001" in skipped


def test_resuming_from_a_checkpoint_deleted_since_the_snapshot_takes_the_next_that_reads(
    tmp_path: Path,
) -> None:
    """The sweep's retention deleted the checkpoint Ray's last snapshot named."""
    from ray.tune import Checkpoint

    for index in (2, 3):  # checkpoint_000000 and _000001 were deleted as not the best
        write_epoch_checkpoint(tmp_path / f"checkpoint_{index:06d}", epoch=index + 1)
    named = Checkpoint(path=str(tmp_path / "checkpoint_000001"))

    assert newest_readable_state(named)["epoch"] == 3
    write_epoch_checkpoint(tmp_path / "checkpoint_000000", epoch=1)
    assert newest_readable_state(named)["epoch"] == 1  # an earlier one goes first


def test_resuming_fails_loudly_when_no_checkpoint_of_the_trial_reads(tmp_path: Path) -> None:
    from ray.tune import Checkpoint

    write_epoch_checkpoint(tmp_path / "checkpoint_000000", epoch=1)
    (tmp_path / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"")
    registered = Checkpoint.from_directory(tmp_path / "checkpoint_000000")
    with pytest.raises(CheckpointCorruptError, match="no readable checkpoint among 1"):
        newest_readable_state(registered)


def save_and_restore(
    directory: Path, scaler: torch.amp.GradScaler | None, fresh_scaler: torch.amp.GradScaler | None
) -> dict[str, object]:
    """Save a baseline_cnn checkpoint with ``scaler``, read it, restore it with ``fresh_scaler``."""
    from cxrtune.trainables.fit import restore

    config = TrialConfig(family="baseline_cnn", lr=1e-3, batch_size=8, imbalance="none")
    model = create_model(config, num_classes=2, image_size=16)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        directory,
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        config=config,
        epoch=2,
        generator=torch.Generator().manual_seed(0),
        class_names=("A", "B"),
        image_size=16,
        metrics={"epoch": 2},
        scaler=scaler,
    )
    state = read_checkpoint(directory)
    resumed = create_model(config, num_classes=2, image_size=16)
    assert (
        restore(
            state, resumed, torch.optim.Adam(resumed.parameters()), torch.Generator(), fresh_scaler
        )
        == 2
    )
    return state


def test_a_checkpoint_carries_the_fp16_loss_scale_into_the_resumed_trial(tmp_path: Path) -> None:
    """Item 9: the GradScaler's learned scale and growth count survive a resume."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    scaler.update(new_scale=512.0)
    scaler._growth_tracker.fill_(2)  # two clean steps since the last back-off
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)

    state = save_and_restore(tmp_path / "checkpoint_000001", scaler, fresh)

    assert state["grad_scaler"] == scaler.state_dict()
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 512.0


def test_a_checkpoint_without_a_scaler_leaves_a_resumed_fp16_scaler_as_it_starts(
    tmp_path: Path,
) -> None:
    """A trial checkpointed in fp32 or bf16 and resumed on an fp16 GPU starts its scale afresh."""
    fresh = torch.amp.GradScaler("cpu")
    state = save_and_restore(tmp_path / "checkpoint_000001", None, fresh)
    assert "grad_scaler" not in state
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()


def test_a_trial_that_used_cuda_saves_and_restores_the_cuda_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9: dropout on a GPU draws from the CUDA generator, so a resume needs its state."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda new_state, device="cuda": restored.append(new_state)
    )
    state = save_and_restore(tmp_path / "checkpoint_000001", None, None)
    assert torch.equal(state["cuda_rng"], cuda_state)
    [set_to] = restored
    assert torch.equal(set_to, cuda_state) and set_to.device.type == "cpu"


def test_a_trial_that_never_used_cuda_saves_no_cuda_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking for the CUDA generator's state would start a CUDA context in a CPU trial."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", pytest.fail)
    monkeypatch.setattr(torch.cuda, "set_rng_state", pytest.fail)
    state = save_and_restore(tmp_path / "checkpoint_000001", None, None)
    assert "cuda_rng" not in state
