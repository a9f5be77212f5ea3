"""Evaluation of one chosen checkpoint on val and on the held-out test split.

The only place the test split is read. The val predictions exist only to choose
an operating threshold; the test predictions are reported and never used for
any choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrtune.analysis.experiment import (
    SPLITS_FILE,
    DatasetInfo,
    Evaluations,
    Experiment,
    Predictions,
)
from cxrtune.trainables.checkpoints import CheckpointCorruptError, model_from_checkpoint
from cxrtune.trainables.data import DataError, ingest, read_cache
from cxrtune.trainables.engine import evaluate
from cxrtune.trainables.splits import read_splits

__all__ = ["EvaluationSet", "evaluate_checkpoint", "evaluate_in_process", "unreadable_reason"]

EVALUATED_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EvaluationSet:
    """The val and test images and labels of an experiment, and its class facts."""

    images: dict[str, np.ndarray]  # split -> N x 1 x H x W uint8, for each of EVALUATED_SPLITS
    labels: dict[str, np.ndarray]  # split -> N class indices
    class_names: tuple[str, ...]
    positive_index: int

    @classmethod
    def load(cls, info: DatasetInfo, splits_path: Path) -> EvaluationSet:
        """Read the dataset from its cache (or decode it again) and keep val and test.

        The cache holds the images as the sweep decoded them. Either way, an image
        whose label or content differs from what ``splits.csv`` records, or a class
        list other than the sweep's, is a ``DataError`` naming it: the test numbers
        would be of other images than the sweep split.
        """
        cache = Path(info.cache_path)
        if cache.is_file():
            dataset = read_cache(cache)
        else:
            # Skipping and dropping give every image the sweep could have used; the
            # split file then picks exactly the ones it did use.
            dataset = ingest(
                info.root,
                info.image_size,
                layout=info.layout,
                skip_bad_images=True,
                drop_conflicting_duplicates=True,
            ).dataset
        if list(dataset.class_names) != list(info.class_names):
            raise DataError(
                f"the classes of {info.root} are now {list(dataset.class_names)}; "
                f"the sweep used {info.class_names}"
            )
        splits = read_splits(dataset, splits_path)
        return cls(
            images={split: dataset.images[splits.of(split)] for split in EVALUATED_SPLITS},
            labels={split: dataset.labels[splits.of(split)] for split in EVALUATED_SPLITS},
            class_names=dataset.class_names,
            positive_index=info.positive_index,
        )

    def predictions(self, probabilities: Mapping[str, np.ndarray]) -> dict[str, Predictions]:
        """``evaluate_checkpoint``'s probabilities beside the labels they are scored against."""
        return {
            split: Predictions(self.labels[split], np.asarray(probabilities[split]))
            for split in EVALUATED_SPLITS
        }


def evaluate_checkpoint(
    checkpoint: Path, evaluation_set: EvaluationSet, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Class probabilities (``N x C``) of the checkpoint's model on val and on test.

    The model is loaded once. A checkpoint trained on other classes is a ``ValueError``.
    """
    model, _, state = model_from_checkpoint(checkpoint, device)
    if list(state["class_names"]) != list(evaluation_set.class_names):
        raise ValueError(
            f"{checkpoint} was trained on classes {state['class_names']}, "
            f"the experiment's data have {list(evaluation_set.class_names)}"
        )
    probabilities = {}
    for split in EVALUATED_SPLITS:
        images = torch.from_numpy(np.ascontiguousarray(evaluation_set.images[split])).to(device)
        labels = torch.as_tensor(evaluation_set.labels[split], dtype=torch.long, device=device)
        _, probabilities[split] = evaluate(model, images, labels)
    return probabilities


def evaluate_in_process(
    experiment: Experiment, checkpoints: Mapping[str, Path], device: str = "cpu"
) -> Evaluations:
    """The leaderboard's default evaluator: each checkpoint in turn, in this process.

    The evaluation set is loaded once, and only when there is a checkpoint to evaluate.
    """
    found: dict[str, dict[str, Predictions]] = {}
    unreadable: dict[str, str] = {}
    if not checkpoints:
        return Evaluations(found, unreadable)
    evaluation_set = EvaluationSet.load(experiment.dataset, experiment.directory / SPLITS_FILE)
    for trial_id, checkpoint in checkpoints.items():
        try:
            probabilities = evaluate_checkpoint(checkpoint, evaluation_set, device)
        except CheckpointCorruptError as error:
            unreadable[trial_id] = unreadable_reason(error)
            continue
        found[trial_id] = evaluation_set.predictions(probabilities)
    return Evaluations(found, unreadable)


def unreadable_reason(error: CheckpointCorruptError) -> str:
    """What the failed trials list says of a checkpoint that cannot be read: its first line."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__
