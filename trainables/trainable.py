"""The Ray Tune trainable: wiring only. The engine does the work.

``train_trial(config, data)`` is a plain function trainable. The driver binds
``data`` with ``tune.with_parameters`` so the arrays sit in Ray's object store
once and every trial on a node reads the same memory.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrtune.trainables.checkpoints import newest_readable_state, save_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import (
    epoch_indices,
    evaluate,
    loss_class_weights,
    train_one_epoch,
)
from cxrtune.trainables.metrics import classification_metrics
from cxrtune.trainables.models import create_model


@dataclass(frozen=True)
class TrialData:
    """What every trial shares: the train and val images (never test) and class facts."""

    train_images: np.ndarray  # N x 1 x H x W uint8
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    class_names: tuple[str, ...]
    positive_index: int

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def train_trial(config: dict[str, Any], data: TrialData) -> None:
    """Train one trial, reporting metrics and a checkpoint to Ray Tune every epoch."""
    from ray import tune

    trial = TrialConfig.from_dict(config)
    threads, device = assigned_resources()
    torch.set_num_threads(threads)
    torch.manual_seed(trial.seed)
    generator = torch.Generator().manual_seed(trial.seed)
    model = create_model(trial, len(data.class_names), data.image_size).to(device)
    optimizer = build_optimizer(trial, model)
    completed_epochs = 0
    if checkpoint := tune.get_checkpoint():
        state = newest_readable_state(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        completed_epochs = state["epoch"]

    train_images, train_labels = _on_device(data.train_images, data.train_labels, device)
    val_images, val_labels = _on_device(data.val_images, data.val_labels, device)
    class_weights = loss_class_weights(data.train_labels, len(data.class_names), trial.imbalance)
    for epoch in range(completed_epochs + 1, trial.max_epochs + 1):
        started = time.perf_counter()
        order = epoch_indices(data.train_labels, trial.imbalance, generator)
        train_loss = train_one_epoch(
            model,
            optimizer,
            train_images,
            train_labels,
            order,
            batch_size=trial.batch_size,
            class_weights=class_weights,
            augment_strength=trial.augment_strength,
            generator=generator,
        )
        val_loss, probabilities = evaluate(model, val_images, val_labels)
        scores = classification_metrics(
            data.val_labels, probabilities, data.class_names, data.positive_index
        )
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{name}": value for name, value in scores.items()},
            "epoch_time_s": time.perf_counter() - started,
        }
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                Path(directory),
                model=model,
                optimizer=optimizer,
                config=trial,
                epoch=epoch,
                generator=generator,
                class_names=data.class_names,
                image_size=data.image_size,
                metrics=metrics,
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def build_optimizer(config: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the Keras ``kernel_regularizer`` the study used) or AdamW."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: adam, adamw")


def _on_device(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Arrays from Ray's object store are read-only views of shared memory; torch
    # warns about that, but nothing here writes to them, and copying would defeat
    # the sharing (on a GPU, ``.to`` copies anyway).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image_tensor = torch.from_numpy(images)
    return image_tensor.to(device), torch.as_tensor(labels, dtype=torch.long, device=device)


def assigned_resources() -> tuple[int, torch.device]:
    """The CPU threads and the device Ray gave this trial."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1.0)))
    use_gpu = assigned.get("GPU", 0) > 0 and torch.cuda.is_available()
    return threads, torch.device("cuda" if use_gpu else "cpu")
