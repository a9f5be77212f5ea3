"""Leakage-safe train / val / test splits, fixed by a seed and saved as ``splits.csv``.

Stratified by class and grouped, so no patient (or source) and no duplicated
image is in two splits. ``val`` guides the search; ``test`` is held out for the
leaderboard only and never reaches a trial.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from cxrtune.trainables.config import GROUPINGS
from cxrtune.trainables.data import DataError, Dataset, contents_in_two_splits

__all__ = [
    "SPLITS",
    "SplitIndices",
    "group_ids",
    "images_in_no_split",
    "make_splits",
    "read_splits",
    "stratified_split",
    "write_splits",
]

SPLITS = ("train", "val", "test")
# Fewer images of a class than this in a split make its recall and AUC noise.
MIN_IMAGES_PER_SPLIT = 3


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
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> SplitIndices:
    """Split indices so each split keeps the class proportions; deterministic for a seed.

    A class too small to appear in every split is a ``DataError`` naming it (by
    ``class_names`` when given, else by label).
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
        names = list(class_names) if class_names is not None else list(range(len(counts)))
        listing = "; ".join(f"{names[index]} has {counts[index]}" for index in too_small)
        raise DataError(
            f"too few images to split: every class needs at least {int(np.ceil(1 / smallest))} "
            f"to appear in every split, but {listing}"
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


def grouped_stratified_split(
    labels: np.ndarray, groups: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> SplitIndices:
    """Split whole groups, keeping class proportions as far as whole groups allow.

    scikit-learn's ``StratifiedGroupKFold`` carves ``test`` as one fold of about
    ``test_fraction``, then ``val`` the same way from the rest; the fractions are
    met approximately.
    """
    everything = np.arange(len(labels))
    try:
        rest, test = _one_group_fold(everything, labels, groups, test_fraction, seed)
        rest_fraction = val_fraction / (1 - test_fraction)
        train, val = _one_group_fold(rest, labels[rest], groups[rest], rest_fraction, seed)
    except ValueError as error:  # scikit-learn's word on groups that cannot be split
        raise DataError(f"cannot split {len(labels)} images by group and class: {error}") from error
    return SplitIndices(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def _one_group_fold(
    indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    folds = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # scikit-learn warns, in its own terms, of a class with fewer images than
        # folds; whether every split still holds enough of each class is checked
        # next (``_require_images_per_split``), naming the class and the split.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        kept, held = next(splitter.split(indices, labels, groups))
    return indices[kept], indices[held]


def group_ids(dataset: Dataset, group_by: str) -> np.ndarray:
    """One id per image such that images that must share a split share an id.

    Images of one patient (or source, per ``group_by``) are linked, and so are
    exact duplicates (same content hash), transitively: a duplicate of an image of
    patient A pulls its own patient into A's group.
    """
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {list(GROUPINGS)}, got {group_by!r}")
    keys = {"patient": dataset.patients, "source": dataset.sources, "none": ()}[group_by]
    count = len(dataset.labels)
    edges_from, edges_to = [], []
    for values in (keys, dataset.hashes):
        first_seen: dict[str, int] = {}
        for index, value in enumerate(values):
            if value:
                edges_from.append(first_seen.setdefault(value, index))
                edges_to.append(index)
    graph = coo_matrix((np.ones(len(edges_from)), (edges_from, edges_to)), shape=(count, count))
    _, components = connected_components(graph, directed=False)
    return np.asarray(components)


def make_splits(
    dataset: Dataset,
    groups: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_source: str | None = None,
) -> SplitIndices:
    """The train / val / test split of a sweep: external, fixed by the dataset, grouped, or not.

    With ``test_source`` every image of that source is the test split (an external-site
    estimate) and val is carved from the other sources, grouped as below. A split the
    dataset fixes (a manifest's ``split`` column) is used as is, after checking that no
    patient and no image content crosses it. Otherwise no group (see ``group_ids``)
    crosses splits. Every class needs at least ``MIN_IMAGES_PER_SPLIT`` images in every
    split.
    """
    if test_source:
        splits = _external_test_split(
            dataset, groups, test_source, val_fraction / (1 - test_fraction), seed
        )
    elif any(dataset.fixed_splits):
        splits = _fixed_splits(dataset)
    elif len(np.unique(groups)) == len(groups):
        splits = stratified_split(
            dataset.labels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            class_names=dataset.class_names,
        )
    else:
        splits = grouped_stratified_split(
            dataset.labels,
            groups,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    try:
        _require_images_per_split(dataset, splits)
    except DataError as error:
        if not test_source:
            raise
        raise DataError(
            f"{error}; with test_source {test_source!r}: {_placement(splits)}"
        ) from None
    return splits


def _placement(splits: SplitIndices) -> str:
    return ", ".join(f"{len(splits.of(split))} {split}" for split in SPLITS) + " images"


def images_in_no_split(dataset: Dataset, splits: SplitIndices) -> int:
    """Images a split left out (of other sources, linked to an external test source)."""
    return len(dataset.labels) - sum(len(splits.of(split)) for split in SPLITS)


def _external_test_split(
    dataset: Dataset, groups: np.ndarray, test_source: str, val_fraction: float, seed: int
) -> SplitIndices:
    """Test = every image of ``test_source``; val = ``val_fraction`` of the rest, by group.

    An image of another source that shares a group with a test image (the same patient,
    or an exact copy) is in no split: in train it would leak the test set.
    """
    if any(dataset.fixed_splits):
        raise DataError("test_source cannot be combined with a manifest's own split column")
    sources = np.array(dataset.sources)
    held_out = sources == test_source
    if not held_out.any():
        counts = pd.Series(sources[sources != ""]).value_counts()
        known = ", ".join(f"{name!r} ({count})" for name, count in counts.items()) or "none"
        raise DataError(f"test_source {test_source!r} matches no image; sources: {known}")
    linked = np.isin(groups, groups[held_out]) & ~held_out
    rest = np.flatnonzero(~held_out & ~linked)
    if len(rest) == 0:
        raise DataError(f"test_source {test_source!r} holds every image; none is left to train")
    labels = dataset.labels[rest]
    try:
        if len(np.unique(groups[rest])) == len(rest):
            train, val = train_test_split(
                rest, test_size=val_fraction, stratify=labels, random_state=seed
            )
        else:
            train, val = _one_group_fold(rest, labels, groups[rest], val_fraction, seed)
    except ValueError as error:  # scikit-learn's word on a split that cannot be stratified
        raise DataError(
            f"cannot split the {len(rest)} images outside test_source {test_source!r} "
            f"into train and val by class: {error}"
        ) from error
    return SplitIndices(train=np.sort(train), val=np.sort(val), test=np.flatnonzero(held_out))


def _fixed_splits(dataset: Dataset) -> SplitIndices:
    fixed = np.array(dataset.fixed_splits)
    if not fixed.all():
        missing = [dataset.paths[index] for index in np.flatnonzero(fixed == "")][:5]
        raise DataError(f"the manifest's split column is empty for some images, e.g. {missing}")
    crossing = []
    patients = np.array(dataset.patients)
    for patient in sorted(set(dataset.patients) - {""}):
        seen = sorted(set(fixed[patients == patient]))
        if len(seen) > 1:
            crossing.append(f"{patient} ({', '.join(seen)})")
    if crossing:
        shown = "; ".join(crossing[:10])
        raise DataError(f"{len(crossing)} patient(s) appear in more than one split: {shown}")
    leaking = contents_in_two_splits(dataset)
    if leaking:
        shown = "; ".join(
            " == ".join(f"{dataset.paths[i]} ({fixed[i]})" for i in indices)
            for indices in leaking[:10]
        )
        raise DataError(
            f"{len(leaking)} image(s) appear in more than one split: {shown}; fix the split "
            "column, or pass --drop-conflicting-duplicates to leave all copies out"
        )
    return SplitIndices(**{split: np.flatnonzero(fixed == split) for split in SPLITS})


def _require_images_per_split(dataset: Dataset, splits: SplitIndices) -> None:
    short = []
    for split in SPLITS:
        counts = np.bincount(dataset.labels[splits.of(split)], minlength=len(dataset.class_names))
        short += [
            f"{name} has {count} in {split}"
            for name, count in zip(dataset.class_names, counts, strict=True)
            if count < MIN_IMAGES_PER_SPLIT
        ]
    if short:
        raise DataError(
            f"too few images to split: every class needs at least {MIN_IMAGES_PER_SPLIT} "
            f"per split, but {'; '.join(short)}"
        )


def splits_table(
    dataset: Dataset, splits: SplitIndices, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per image: ``path``, ``label``, ``group``, ``split``, ``content_hash``.

    Without ``groups`` every image is its own group.
    """
    if groups is None:
        groups = np.arange(len(dataset.labels))
    split_of = np.empty(len(dataset.labels), dtype=object)
    for split in SPLITS:
        split_of[splits.of(split)] = split
    return pd.DataFrame(
        {
            "path": list(dataset.paths),
            "label": [dataset.class_names[label] for label in dataset.labels],
            "group": groups,
            "split": split_of,
            "content_hash": list(dataset.hashes),
        }
    )


def write_splits(
    dataset: Dataset, splits: SplitIndices, path: Path, groups: np.ndarray | None = None
) -> None:
    """Write ``splits.csv``."""
    splits_table(dataset, splits, groups).to_csv(path, index=False)


def read_splits(dataset: Dataset, path: Path) -> SplitIndices:
    """Read a ``splits.csv`` back as indices into ``dataset``, matching images by path.

    ``dataset`` may hold more images than the split (files a sweep skipped or
    dropped). An image of the split that ``dataset`` lacks, or whose label or
    content hash differs from the one the file records, is a ``DataError``
    naming it: the split no longer describes these images.
    """
    table = pd.read_csv(path, keep_default_na=False)
    index_of = {image_path: index for index, image_path in enumerate(dataset.paths)}
    missing = [image_path for image_path in table["path"] if image_path not in index_of]
    if missing:
        raise DataError(
            f"{path} lists {len(missing)} image(s) the dataset no longer has, e.g. {missing[:3]}; "
            "was the dataset folder changed after the sweep?"
        )
    indices = table["path"].map(index_of).to_numpy()
    labels = np.array(dataset.class_names)[dataset.labels[indices]]
    changed = table["label"].to_numpy() != labels
    if "content_hash" in table:  # absent from splits files older than the column
        changed |= table["content_hash"].to_numpy() != np.array(dataset.hashes)[indices]
    if changed.any():
        paths = table["path"][changed].tolist()
        raise DataError(
            f"{len(paths)} image(s) of {path} changed since the sweep started (label or "
            f"content), e.g. {paths[:3]}"
        )
    split = table["split"].to_numpy()
    return SplitIndices(**{name: np.sort(indices[split == name]) for name in SPLITS})
