from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrtune.trainables.data import DataError, Dataset
from cxrtune.trainables.splits import read_splits, stratified_split, write_splits

LABELS = np.repeat([0, 1, 2, 3], [40, 120, 160, 80])


def split(seed: int = 0):
    return stratified_split(LABELS, val_fraction=0.15, test_fraction=0.15, seed=seed)


def test_the_splits_are_disjoint_and_cover_every_image() -> None:
    parts = split()
    joined = np.concatenate([parts.train, parts.val, parts.test])
    assert sorted(joined) == list(range(len(LABELS)))
    assert len(parts.train) == 280 and len(parts.val) == 60 and len(parts.test) == 60


def test_each_split_keeps_the_class_proportions() -> None:
    parts = split()
    overall = np.bincount(LABELS) / len(LABELS)
    for indices in (parts.train, parts.val, parts.test):
        proportions = np.bincount(LABELS[indices], minlength=4) / len(indices)
        assert np.abs(proportions - overall).max() < 0.02


def test_the_split_is_fixed_by_the_seed() -> None:
    assert np.array_equal(split(1).test, split(1).test)
    assert not np.array_equal(split(1).test, split(2).test)


def test_a_class_too_small_for_every_split_is_an_error() -> None:
    labels = np.repeat([0, 1], [3, 100])
    with pytest.raises(DataError, match="too few"):
        stratified_split(labels, val_fraction=0.15, test_fraction=0.15, seed=0)


def test_splits_csv_round_trips(tmp_path: Path) -> None:
    dataset = Dataset(
        images=np.zeros((len(LABELS), 1, 2, 2), dtype=np.uint8),
        labels=LABELS,
        class_names=("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"),
        paths=tuple(f"c/{i}.png" for i in range(len(LABELS))),
    )
    parts = split()
    write_splits(dataset, parts, tmp_path / "splits.csv")
    text = (tmp_path / "splits.csv").read_text().splitlines()
    assert text[0] == "path,label,group,split,content_hash"
    again = read_splits(dataset, tmp_path / "splits.csv")
    assert all(np.array_equal(again.of(s), parts.of(s)) for s in ("train", "val", "test"))
