"""The checkpoint file a trial writes each epoch, and how to read it back.

One ``checkpoint.pt`` per checkpoint directory holds the model and optimizer
state, the epoch, the random number states, the resolved ``TrialConfig`` and what the
model needs to be rebuilt (class names, image size). It contains only tensors
and builtins, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.models import create_model

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrialConfig,
    epoch: int,
    generator: torch.Generator,
    class_names: tuple[str, ...],
    image_size: int,
    metrics: dict[str, float],
) -> Path:
    """Write ``directory/checkpoint.pt``; ``epoch`` is the number of epochs completed."""
    path = directory / CHECKPOINT_FILE
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "generator": generator.get_state(),
            # Dropout draws from torch's global generator; saving it makes a resumed
            # trial continue exactly where the interrupted one stopped.
            "torch_rng": torch.get_rng_state(),
            "trial_config": config.to_dict(),
            "class_names": list(class_names),
            "image_size": image_size,
            "metrics": dict(metrics),
        },
        path,
    )
    return path


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (a directory holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    return state


def model_from_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TrialConfig, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint, in eval mode, with its config and raw state.

    Pretrained weights are not reloaded from their original file (which may not
    exist on this machine): the checkpoint holds every weight.
    """
    state = read_checkpoint(path, device)
    config = TrialConfig.from_dict(state["trial_config"])
    model = create_model(
        dataclasses.replace(config, weights="none"), len(state["class_names"]), state["image_size"]
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state
