"""The train / evaluate engine: plain functions of a model and tensors, no Ray.

Images stay uint8 on the trial's device (``N x 1 x H x W``) and are turned into
normalised floats one batch at a time, so a dataset costs one byte per pixel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import WeightedRandomSampler

from cxrtune.trainables.augment import augment_batch
from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot go on."""


def to_model_input(
    images: torch.Tensor, augment_strength: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 ``B x 1 x H x W`` -> normalised float, augmented when ``augment_strength > 0``."""
    if augment_strength > 0:
        batch = augment_batch(images.float(), augment_strength, generator, value_max=255.0)
    else:
        batch = images.float().div_(255.0)
    return batch.sub_(GRAY_MEAN).div_(GRAY_STD).contiguous(memory_format=torch.channels_last)


def epoch_indices(labels: np.ndarray, imbalance: str, generator: torch.Generator) -> torch.Tensor:
    """The order of training examples for one epoch.

    ``oversample`` draws with replacement so every class is equally likely
    (balanced in expectation); anything else is a plain shuffle.
    """
    if imbalance == "oversample":
        counts = np.bincount(labels)
        weights = (1.0 / counts[labels]).tolist()
        sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
        return torch.tensor(list(sampler))
    return torch.randperm(len(labels), generator=generator)


def loss_class_weights(labels: np.ndarray, num_classes: int, imbalance: str) -> torch.Tensor | None:
    """Inverse-frequency class weights for the loss under ``class_weight``, else ``None``."""
    if imbalance != "class_weight":
        return None
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return torch.as_tensor(weights, dtype=torch.float32)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    *,
    batch_size: int,
    class_weights: torch.Tensor | None = None,
    augment_strength: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """One pass over ``images[order]``; returns the mean training loss.

    Raises ``NonFiniteLossError`` as soon as a batch loss is NaN or infinite.
    """
    model.train()
    device = images.device
    weight = class_weights.to(device) if class_weights is not None else None
    total_loss, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size].to(device)
        if len(batch) < 2 and seen:
            break  # a lone last example would break batch norm and adds nothing
        inputs = to_model_input(images[batch], augment_strength, generator)
        loss = F.cross_entropy(model(inputs), labels[batch], weight=weight)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} after {seen} examples; "
                "lower the learning rate or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        seen += len(batch)
    return total_loss / max(seen, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and class probabilities (``N x C``, float64) on ``images``."""
    model.eval()
    logits = torch.cat(
        [
            model(to_model_input(images[start : start + batch_size])).float()
            for start in range(0, len(images), batch_size)
        ]
    )
    loss = F.cross_entropy(logits, labels.to(logits.device)).item()
    probabilities = torch.softmax(logits.double(), dim=1).cpu().numpy()
    return loss, probabilities
