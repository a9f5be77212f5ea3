"""The train / evaluate engine: plain functions of a model and tensors, no Ray.

Images stay uint8 on the trial's device (``N x 1 x H x W``) and are turned into
normalised floats one batch at a time, so a dataset costs one byte per pixel.
On a GPU the loops run under mixed precision (``choose_precision``) and never
wait for the GPU inside an epoch, except for the non-finite-loss check every
``NON_FINITE_CHECK_STEPS`` steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import WeightedRandomSampler

from cxrtune.trainables.augment import augment_batch
from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD

__all__ = [
    "NON_FINITE_CHECK_STEPS",
    "PRECISIONS",
    "NonFiniteLossError",
    "Precision",
    "autocast",
    "choose_precision",
    "epoch_indices",
    "epoch_seed",
    "evaluate",
    "grad_scaler",
    "loss_class_weights",
    "shard_for_rank",
    "to_model_input",
    "train_one_epoch",
]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")

# Reading a loss on the host waits for the GPU to finish every queued step, so the
# non-finite check looks every this many steps (and at the end of the epoch), not
# after each one. A diverged trial still stops within this many steps.
NON_FINITE_CHECK_STEPS = 50


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot go on."""


def choose_precision(
    device: torch.device, bf16_supported: Callable[[], bool] | None = None
) -> Precision:
    """The arithmetic a trial on ``device`` trains in.

    A GPU with bf16 (Ampere and newer: A10G, A100, H100) gets bf16 autocast: it
    has float32's exponent range, so nothing overflows and no loss scaling is
    needed. An older GPU (T4, V100) gets fp16 autocast with a ``GradScaler``:
    its tensor cores make it 2-3x faster than fp32 there, and the scaler keeps
    small gradients from vanishing. A CPU stays in fp32, because most CPUs have
    no fast low-precision kernels. ``bf16_supported`` defaults to asking torch
    whether the GPU has bf16 in hardware.
    """
    if device.type != "cuda":
        return "fp32"
    supported = bf16_supported or _has_hardware_bf16
    return "bf16" if supported() else "fp16"


def _has_hardware_bf16() -> bool:
    # By default torch also answers yes for GPUs that only emulate bf16 (T4,
    # V100), where it is slower than fp16 and even than fp32.
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs (one per trial: it learns its scale as it goes), else ``None``."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


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


def shard_for_rank(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The part of an epoch's ``order`` that data-parallel worker ``rank`` trains on.

    As ``DistributedSampler`` does: the order is padded with its own start to a
    multiple of ``world_size`` and worker ``rank`` takes every ``world_size``-th
    index from ``rank`` on. Every worker gets the same number of examples (so
    all take the same number of steps and none waits forever in an all-reduce),
    and with a per-worker batch of ``b`` the workers' ``k``-th batches together
    are exactly the ``k``-th batch of ``b * world_size`` of the unsharded order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    padded_length = math.ceil(len(order) / world_size) * world_size
    padding = padded_length - len(order)
    padded = torch.cat([order, order.repeat(math.ceil(padding / max(len(order), 1)))[:padding]])
    return padded[rank::world_size]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for one worker's randomness in one epoch (augmentation, dropout).

    Derived, not carried over, so a trial resumed at any epoch draws exactly
    what the uninterrupted trial drew, on every worker, without saving each
    worker's generator state.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


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
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over ``images[order]``; returns the mean training loss.

    The forward pass runs under ``precision`` autocast; fp16 needs ``scaler``.
    Raises ``NonFiniteLossError`` when a batch loss is NaN or infinite, at the
    next check (every ``NON_FINITE_CHECK_STEPS`` steps and at the end of the
    epoch), naming the first such step.
    """
    if precision == "fp16" and scaler is None:
        raise ValueError("fp16 training needs a GradScaler (see grad_scaler)")
    model.train()
    device = images.device
    weight = class_weights.to(device) if class_weights is not None else None
    # One copy of the epoch's order to the device; copying each batch's indices
    # would make the host wait for the GPU at every step.
    order = order.to(device)
    loss_sum = torch.zeros((), device=device)
    watch = _NonFiniteWatch(device)
    seen = 0
    for step, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start : start + batch_size]
        if len(batch) < 2 and seen:
            break  # a lone last example would break batch norm and adds nothing
        inputs = to_model_input(images[batch], augment_strength, generator)
        with autocast(device, precision):
            loss = F.cross_entropy(model(inputs), labels[batch], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss = loss.detach().float()
        watch.record(loss, step, seen)
        loss_sum += loss * len(batch)
        seen += len(batch)
        if (step + 1) % NON_FINITE_CHECK_STEPS == 0:
            watch.raise_if_seen()
    watch.raise_if_seen()
    return loss_sum.item() / max(seen, 1)


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), device=device)
        self.examples_before = torch.zeros((), dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor, step: int, seen: int) -> None:
        is_first = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(is_first, step, self.first_step)
        self.first_loss = torch.where(is_first, loss, self.first_loss)
        self.examples_before = torch.where(is_first, seen, self.examples_before)

    def raise_if_seen(self) -> None:
        step = int(self.first_step.item())  # the one host sync of a check
        if step >= 0:
            raise NonFiniteLossError(
                f"training loss became {self.first_loss.item()} at step {step} "
                f"(after {int(self.examples_before.item())} examples); "
                "lower the learning rate or check the data"
            )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    precision: Precision = "fp32",
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and class probabilities (``N x C``, float64) on ``images``."""
    model.eval()
    with autocast(images.device, precision):
        logits = torch.cat(
            [
                model(to_model_input(images[start : start + batch_size])).float()
                for start in range(0, len(images), batch_size)
            ]
        )
    loss = F.cross_entropy(logits, labels.to(logits.device)).item()
    probabilities = torch.softmax(logits.double(), dim=1).cpu().numpy()
    return loss, probabilities
