from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from cxrtune.trainables.checkpoints import model_from_checkpoint, read_checkpoint, save_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.models import create_model


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
    model = create_model(config, num_classes=3, image_size=32)
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
