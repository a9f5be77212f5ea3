"""Stratified train / val / test split, fixed by a seed and saved as ``splits.csv``.

``val`` guides the search; ``test`` is held out for the leaderboard only and
never reaches a trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cxrtune.trainables.data import DataError, Dataset

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitIndices:
    """Row indices into a ``Dataset`` for each split, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def of(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        indices: np.ndarray = getattr(self, split)
        return indices


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> SplitIndices:
    """Split indices so each split keeps the class proportions; deterministic for a seed.

    A class too small to appear in every split is a ``DataError`` naming it.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val and test fractions must be in (0, 1) and sum below 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    counts = np.bincount(labels)
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    too_small = [index for index, count in enumerate(counts) if count * smallest < 1]
    if too_small:
        raise DataError(
            f"class(es) {too_small} have too few images ({counts[too_small].tolist()}) "
            f"to appear in every split; each needs at least {int(np.ceil(1 / smallest))}"
        )
    # Whole counts, so 15% of 400 is exactly 60 and not 61 by float rounding.
    test_count = round(test_fraction * len(labels))
    val_count = round(val_fraction * len(labels))
    everything = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            everything, test_size=test_count, stratify=labels, random_state=seed
        )
        train, val = train_test_split(
            rest, test_size=val_count, stratify=labels[rest], random_state=seed
        )
    except ValueError as error:  # scikit-learn's word on a split that cannot be stratified
        raise DataError(f"cannot split {len(labels)} images by class: {error}") from error
    return SplitIndices(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def splits_table(dataset: Dataset, splits: SplitIndices) -> pd.DataFrame:
    """One row per image: ``path``, ``label`` (class name), ``split``, in dataset order."""
    split_of = np.empty(len(dataset.labels), dtype=object)
    for split in SPLITS:
        split_of[splits.of(split)] = split
    return pd.DataFrame(
        {
            "path": list(dataset.paths),
            "label": [dataset.class_names[label] for label in dataset.labels],
            "split": split_of,
        }
    )


def write_splits(dataset: Dataset, splits: SplitIndices, path: Path) -> None:
    """Write ``splits.csv``."""
    splits_table(dataset, splits).to_csv(path, index=False)


def read_splits(dataset: Dataset, path: Path) -> SplitIndices:
    """Read a ``splits.csv`` back as indices into ``dataset``; it must list the same images."""
    table = pd.read_csv(path, keep_default_na=False)
    if list(table["path"]) != list(dataset.paths):
        raise DataError(
            f"{path} does not list the images of the dataset it was written for; "
            "was the dataset folder changed after the sweep?"
        )
    return SplitIndices(
        **{split: np.flatnonzero(table["split"].to_numpy() == split) for split in SPLITS}
    )
