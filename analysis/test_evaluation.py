"""Held-out test evaluation of one checkpoint. The only place the test split is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrtune.analysis.experiment import DatasetInfo
from cxrtune.trainables.checkpoints import model_from_checkpoint
from cxrtune.trainables.data import load_image_folder, read_cache
from cxrtune.trainables.engine import evaluate
from cxrtune.trainables.metrics import classification_metrics
from cxrtune.trainables.splits import read_splits


@dataclass(frozen=True)
class TestSet:
    """The test images and labels of an experiment, and its class facts."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    positive_index: int

    @classmethod
    def load(cls, info: DatasetInfo, splits_path: Path) -> TestSet:
        """Read the dataset from its cache (or decode it again) and keep the test split."""
        cache = Path(info.cache_path)
        if cache.is_file():
            dataset = read_cache(cache)
        else:
            dataset, _ = load_image_folder(info.root, info.image_size)
        test = read_splits(dataset, splits_path).test
        return cls(
            images=dataset.images[test],
            labels=dataset.labels[test],
            class_names=dataset.class_names,
            positive_index=info.positive_index,
        )


def evaluate_checkpoint(
    checkpoint: Path, test_set: TestSet, device: str = "cpu"
) -> tuple[dict[str, float], np.ndarray]:
    """``test_``-prefixed metrics and class probabilities of the checkpoint's model on test."""
    model, _, state = model_from_checkpoint(checkpoint, device)
    if list(state["class_names"]) != list(test_set.class_names):
        raise ValueError(
            f"{checkpoint} was trained on classes {state['class_names']}, "
            f"the test set has {list(test_set.class_names)}"
        )
    images = torch.from_numpy(np.ascontiguousarray(test_set.images)).to(device)
    labels = torch.as_tensor(test_set.labels, dtype=torch.long, device=device)
    _, probabilities = evaluate(model, images, labels)
    scores = classification_metrics(
        test_set.labels, probabilities, test_set.class_names, test_set.positive_index
    )
    return {f"test_{name}": value for name, value in scores.items()}, probabilities
