"""One trial's epoch loop, shared by a trial in one process and by data-parallel workers.

``fit`` builds the model and optimizer, restores a checkpoint's state, and then
once per epoch calls ``train_one_epoch`` and ``evaluate`` (``engine``) and hands
the epoch's metrics and checkpoint to a ``TrialReports``: Tune's session for a
trial that trains in one process (``trainable``), Ray Train's for each worker of
a data-parallel trial (``data_parallel``). A fix to the loop is made here once.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cxrtune.trainables.checkpoints import CUDA_RNG_KEY, GRAD_SCALER_KEY, save_checkpoint
from cxrtune.trainables.config import OPTIMIZERS, TrialConfig
from cxrtune.trainables.devices import on_device
from cxrtune.trainables.engine import (
    Precision,
    choose_precision,
    epoch_indices,
    epoch_seed,
    evaluate,
    grad_scaler,
    loss_class_weights,
    shard_for_rank,
    train_one_epoch,
)
from cxrtune.trainables.metrics import DEFAULT_TARGET_SPECIFICITY, classification_metrics
from cxrtune.trainables.models import StateDict, create_model

__all__ = [
    "TrialData",
    "TrialReports",
    "build_optimizer",
    "epoch_metrics",
    "fit",
    "restore",
    "save_epoch_checkpoint",
]


@dataclass(frozen=True)
class TrialData:
    """What every trial shares: the train and val images (never test) and class facts."""

    train_images: np.ndarray  # N x 1 x H x W uint8
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    class_names: tuple[str, ...]
    positive_index: int
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY  # for val_covid_recall_at_spec

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


class TrialReports(Protocol):
    """Where one training process of a trial sends its epochs, and how it shares the trial.

    A trial in one process is rank 0 of 1. Rank 0 evaluates and checkpoints; other
    ranks report their epoch's train loss only, so the workers move on together.
    """

    rank: int
    world_size: int

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this process trains it: itself, or wrapped to average gradients."""
        ...

    def mean_train_loss(self, loss: float, device: torch.device) -> float:
        """The epoch's train loss over every worker, from this process's share of it."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Hand one epoch on, with the folder of its checkpoint (rank 0) or none."""
        ...


def fit(
    trial: TrialConfig,
    data: TrialData,
    state: dict[str, Any] | None,
    device: torch.device,
    reports: TrialReports,
    pretrained: StateDict | None = None,
) -> None:
    """Train ``trial`` from ``state`` (a checkpoint's, or ``None``) to its last epoch.

    With several workers, every one draws the same epoch order from the trial's
    seeded generator and trains on its own shard of it (``shard_for_rank``), with a
    per-worker batch of ``ceil(batch_size / workers)``, so one step of all workers
    is one step on a batch of about ``batch_size``.
    """
    rank, world_size = reports.rank, reports.world_size
    torch.manual_seed(trial.seed)
    generator = torch.Generator().manual_seed(trial.seed)  # the epoch order
    model = create_model(trial, len(data.class_names), data.image_size, pretrained).to(device)
    optimizer = build_optimizer(trial, model)
    precision = choose_precision(device)
    # With workers, rank 0's scale is every worker's: all step on the same gradients.
    scaler = grad_scaler(device, precision)
    completed_epochs = restore(state, model, optimizer, generator, scaler) if state else 0
    trained = reports.replicate(model)
    batch_size = math.ceil(trial.batch_size / world_size)

    train_images, train_labels = on_device(data.train_images, data.train_labels, device)
    if rank == 0:
        val_images, val_labels = on_device(data.val_images, data.val_labels, device)
    class_weights = loss_class_weights(data.train_labels, len(data.class_names), trial.imbalance)
    for epoch in range(completed_epochs + 1, trial.max_epochs + 1):
        started = time.perf_counter()
        order = epoch_indices(data.train_labels, trial.imbalance, generator)
        draws = generator
        if world_size > 1:
            # Each worker's dropout and augmentation draws differ, and a resumed
            # trial repeats them exactly.
            torch.manual_seed(epoch_seed(trial.seed, epoch, rank))
            draws = torch.Generator().manual_seed(epoch_seed(trial.seed, epoch, rank))
            order = shard_for_rank(order, rank, world_size)
        shard_loss = train_one_epoch(
            trained,
            optimizer,
            train_images,
            train_labels,
            order,
            batch_size=batch_size,
            class_weights=class_weights,
            augment_strength=trial.augment_strength,
            generator=draws,
            precision=precision,
            scaler=scaler,
        )
        train_loss = reports.mean_train_loss(shard_loss, device)
        if rank != 0:
            reports.report({"epoch": epoch, "train_loss": train_loss}, None)
            continue
        metrics = epoch_metrics(
            epoch, train_loss, model, val_images, val_labels, data, precision, started
        )
        with tempfile.TemporaryDirectory() as directory:
            save_epoch_checkpoint(
                Path(directory), model, optimizer, trial, generator, data, metrics, scaler
            )
            reports.report(metrics, Path(directory))


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Load a checkpoint's state into a fresh trial; returns the epochs it had completed.

    The CUDA generator is restored when the checkpoint has one and CUDA is here;
    ``scaler`` (an fp16 trial's) takes the checkpoint's scale when it has one. A
    checkpoint written in another precision leaves the scaler as it starts.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if CUDA_RNG_KEY in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[CUDA_RNG_KEY].cpu())
    if scaler is not None and GRAD_SCALER_KEY in state:
        scaler.load_state_dict(state[GRAD_SCALER_KEY])
    return int(state["epoch"])


def epoch_metrics(
    epoch: int,
    train_loss: float,
    model: torch.nn.Module,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    data: TrialData,
    precision: Precision,
    started: float,
) -> dict[str, Any]:
    """Evaluate on val and build the flat, split-prefixed dict an epoch reports."""
    val_loss, probabilities = evaluate(model, val_images, val_labels, precision=precision)
    scores = classification_metrics(
        data.val_labels,
        probabilities,
        data.class_names,
        data.positive_index,
        target_specificity=data.target_specificity,
    )
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **{f"val_{name}": value for name, value in scores.items()},
        "epoch_time_s": time.perf_counter() - started,
        # What the numbers were computed in, so results say what ran.
        "precision": precision,
    }


def save_epoch_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trial: TrialConfig,
    generator: torch.Generator,
    data: TrialData,
    metrics: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write the checkpoint of the epoch ``metrics`` describe into ``directory``."""
    save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        config=trial,
        epoch=metrics["epoch"],
        generator=generator,
        class_names=data.class_names,
        image_size=data.image_size,
        metrics=metrics,
        scaler=scaler,
    )


def build_optimizer(config: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the Keras ``kernel_regularizer`` the study used) or AdamW."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
