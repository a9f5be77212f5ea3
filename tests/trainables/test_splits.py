from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrtune.trainables.data import DataError, Dataset
from cxrtune.trainables.splits import (
    group_ids,
    images_in_no_split,
    make_splits,
    read_splits,
    stratified_split,
    write_splits,
)

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


def hashed_dataset(labels: np.ndarray = LABELS) -> Dataset:
    return Dataset(
        images=np.zeros((len(labels), 1, 2, 2), dtype=np.uint8),
        labels=labels,
        class_names=("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"),
        paths=tuple(f"c/{i}.png" for i in range(len(labels))),
        hashes=tuple(f"hash-{i}" for i in range(len(labels))),
    )


def test_reading_splits_refuses_images_whose_content_or_label_changed_item_5(
    tmp_path: Path,
) -> None:
    """Issue item 5: resume and test evaluation read the split through this one check."""
    write_splits(hashed_dataset(), split(), tmp_path / "splits.csv")
    hashes = list(hashed_dataset().hashes)
    hashes[7] = "other"
    edited = dataclasses.replace(hashed_dataset(), hashes=tuple(hashes))
    with pytest.raises(DataError, match=r"1 image\(s\) of .*splits\.csv changed.*'c/7\.png'"):
        read_splits(edited, tmp_path / "splits.csv")
    relabelled = hashed_dataset(np.where(np.arange(len(LABELS)) == 3, 2, LABELS))
    with pytest.raises(DataError, match=r"changed since the sweep started.*'c/3\.png'"):
        read_splits(relabelled, tmp_path / "splits.csv")


def test_splits_written_before_content_hashes_are_read_by_label(tmp_path: Path) -> None:
    write_splits(hashed_dataset(), split(), tmp_path / "splits.csv")
    table = pd.read_csv(tmp_path / "splits.csv").drop(columns="content_hash")
    table.to_csv(tmp_path / "splits.csv", index=False)
    again = read_splits(hashed_dataset(), tmp_path / "splits.csv")
    assert np.array_equal(again.test, split().test)


def patient_dataset(seed: int = 0) -> Dataset:
    """600 images of 150 patients (1 to 7 images each), four classes, some exact duplicates."""
    rng = np.random.default_rng(seed)
    labels, patients, hashes = [], [], []
    for patient in range(150):
        label = int(rng.choice(4, p=[0.1, 0.3, 0.4, 0.2]))
        for image in range(int(rng.integers(1, 8))):
            labels.append(label)
            patients.append(f"patient-{patient}")
            hashes.append(f"h{patient}-{image}")
    # A re-uploaded copy: the first picture again, under another patient of its class.
    copy = next(i for i in range(100, len(labels)) if labels[i] == labels[0])
    hashes[copy] = hashes[0]
    count = len(labels)
    return Dataset(
        images=np.zeros((count, 1, 2, 2), dtype=np.uint8),
        labels=np.array(labels),
        class_names=("COVID", "Lung_Opacity", "Normal", "Viral_Pneumonia"),
        paths=tuple(f"{i}.png" for i in range(count)),
        hashes=tuple(hashes),
        patients=tuple(patients),
    )


def grouped(dataset: Dataset, seed: int = 0, group_by: str = "patient"):
    groups = group_ids(dataset, group_by)
    return make_splits(dataset, groups, val_fraction=0.15, test_fraction=0.15, seed=seed), groups


def test_no_patient_and_no_content_hash_crosses_splits() -> None:
    dataset = patient_dataset()
    parts, _ = grouped(dataset)
    owner: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for index in parts.of(split):
            for key in (dataset.patients[index], dataset.hashes[index]):
                assert owner.setdefault(key, split) == split, f"{key} is in two splits"
    assert sum(len(parts.of(s)) for s in ("train", "val", "test")) == len(dataset.labels)


def test_grouped_splits_stay_close_to_the_fractions_and_class_mix() -> None:
    dataset = patient_dataset()
    parts, _ = grouped(dataset)
    total = len(dataset.labels)
    assert abs(len(parts.test) / total - 0.15) < 0.04
    assert abs(len(parts.val) / total - 0.15) < 0.04
    overall = np.bincount(dataset.labels, minlength=4) / total
    test_mix = np.bincount(dataset.labels[parts.test], minlength=4) / len(parts.test)
    assert np.abs(test_mix - overall).max() < 0.08


def test_grouped_splits_are_fixed_by_the_seed() -> None:
    dataset = patient_dataset()
    assert np.array_equal(grouped(dataset, seed=3)[0].test, grouped(dataset, seed=3)[0].test)
    assert not np.array_equal(grouped(dataset, seed=3)[0].test, grouped(dataset, seed=4)[0].test)


def test_duplicates_link_the_groups_of_their_copies() -> None:
    dataset = patient_dataset()
    copy = dataset.hashes.index(dataset.hashes[0], 1)
    alone = group_ids(dataset, "none")
    assert alone[0] == alone[copy]
    assert len(set(alone)) == len(set(dataset.hashes)) == len(dataset.hashes) - 1
    by_patient = group_ids(dataset, "patient")
    # The copy pulls its whole patient into the first patient's group.
    copy_patient = [i for i, p in enumerate(dataset.patients) if p == dataset.patients[copy]]
    assert {by_patient[i] for i in copy_patient} == {by_patient[0]}


def test_a_split_fixed_by_the_dataset_is_used_as_is() -> None:
    dataset = patient_dataset()
    fixed = tuple(("train", "val", "test")[int(p.split("-")[1]) % 3] for p in dataset.patients)
    dataset = Dataset(**{**dataset.__dict__, "fixed_splits": fixed})
    parts, _ = grouped(dataset)
    assert all(fixed[i] == "test" for i in parts.test)
    assert len(parts.test) == fixed.count("test")


def test_a_fixed_split_that_a_patient_crosses_is_refused() -> None:
    dataset = patient_dataset()
    fixed = ["train"] * len(dataset.labels)
    for index in range(0, len(fixed), 3):
        fixed[index] = "test"
    for index in range(1, len(fixed), 3):
        fixed[index] = "val"
    dataset = Dataset(**{**dataset.__dict__, "fixed_splits": tuple(fixed)})
    with pytest.raises(DataError, match="patient-0 \\("):
        grouped(dataset)


def test_a_class_with_fewer_than_three_images_in_a_split_is_refused() -> None:
    labels = np.repeat([0, 1], [12, 100])
    dataset = Dataset(
        images=np.zeros((112, 1, 2, 2), dtype=np.uint8),
        labels=labels,
        class_names=("COVID", "Normal"),
        paths=tuple(f"{i}.png" for i in range(112)),
        hashes=tuple(str(i) for i in range(112)),
    )
    with pytest.raises(DataError, match=r"at least 3 per split.*COVID has 2"):
        grouped(dataset)


def test_splits_csv_records_group_and_content_hash(tmp_path: Path) -> None:
    dataset = patient_dataset()
    parts, groups = grouped(dataset)
    write_splits(dataset, parts, tmp_path / "splits.csv", groups)
    table = pd.read_csv(tmp_path / "splits.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "label", "group", "split", "content_hash"]
    assert table.groupby("group")["split"].nunique().max() == 1
    assert table.groupby("content_hash")["split"].nunique().max() == 1


def test_a_fixed_split_that_puts_one_image_content_in_two_splits_is_refused_naming_both() -> None:
    """Item 4: a manifest's split column must not leak a duplicated image across splits."""
    dataset = patient_dataset()
    copy = dataset.hashes.index(dataset.hashes[0], 1)
    # Whole patients per split; the re-uploaded copy's patient goes to test, patient-0 to train.
    fixed = tuple(
        "train" if p == "patient-0" else "test" if p == dataset.patients[copy] else "val"
        for p in dataset.patients
    )
    dataset = Dataset(**{**dataset.__dict__, "fixed_splits": fixed})
    shown = f"0.png \\({fixed[0]}\\) == {copy}.png \\({fixed[copy]}\\)"
    with pytest.raises(DataError, match=f"1 image\\(s\\) appear in more than one split: {shown}"):
        grouped(dataset)


def test_a_class_too_small_to_split_is_named_and_scikit_learn_stays_quiet() -> None:
    """A class of 2 images, grouped by patient and not: refused in cxrtune's words only."""
    labels = np.repeat([0, 1], [2, 40])
    dataset = Dataset(
        images=np.zeros((42, 1, 2, 2), dtype=np.uint8),
        labels=labels,
        class_names=("COVID", "Normal"),
        paths=tuple(f"{i}.png" for i in range(42)),
        hashes=tuple(str(i) for i in range(42)),
        patients=tuple(f"patient-{i // 2}" for i in range(42)),
    )
    for group_by in ("patient", "none"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            with pytest.raises(DataError, match=r"too few images to split.*COVID has"):
                grouped(dataset, group_by=group_by)


def two_source_dataset(per_source: dict[str, list[int]], patients_per_image: int = 1) -> Dataset:
    """Images of two or more sources; ``per_source`` gives each source's images per class."""
    labels, sources, patients = [], [], []
    for source, counts in per_source.items():
        for label, count in enumerate(counts):
            for index in range(count):
                labels.append(label)
                sources.append(source)
                patients.append(f"{source}-{label}-{index // patients_per_image}")
    count = len(labels)
    return Dataset(
        images=np.zeros((count, 1, 8, 8), dtype=np.uint8),
        labels=np.array(labels),
        class_names=("COVID", "Normal"),
        paths=tuple(f"{i}.png" for i in range(count)),
        hashes=tuple(f"h{i}" for i in range(count)),
        patients=tuple(patients),
        sources=tuple(sources),
    )


def test_a_test_source_holds_out_its_images_and_val_comes_from_the_rest_by_patient() -> None:
    """Issue item 3: the external-site test split."""
    dataset = two_source_dataset({"A": [30, 60], "B": [10, 20]}, patients_per_image=2)
    groups = group_ids(dataset, "patient")
    parts = make_splits(
        dataset, groups, val_fraction=0.15, test_fraction=0.15, seed=0, test_source="B"
    )
    sources = np.array(dataset.sources)
    assert set(sources[parts.test]) == {"B"} and len(parts.test) == 30
    assert set(sources[parts.train]) == set(sources[parts.val]) == {"A"}
    assert len(parts.train) + len(parts.val) == 90
    assert 0.1 < len(parts.val) / 90 < 0.3  # val_fraction of the whole, kept against train
    patients = np.array(dataset.patients)
    assert not set(patients[parts.train]) & set(patients[parts.val])


def test_an_image_linked_to_the_test_source_is_in_no_split() -> None:
    """Issue item 3: a copy of a test image elsewhere would leak the external test set."""
    base = two_source_dataset({"A": [30, 60], "B": [10, 20]})
    hashes = list(base.hashes)
    hashes[0] = hashes[-1]  # an image of A is an exact copy of one of B
    dataset = dataclasses.replace(base, hashes=tuple(hashes))
    groups = group_ids(dataset, "patient")
    parts = make_splits(
        dataset, groups, val_fraction=0.15, test_fraction=0.15, seed=0, test_source="B"
    )
    placed = np.concatenate([parts.train, parts.val, parts.test])
    assert 0 not in placed and len(placed) == len(dataset.labels) - 1
    assert images_in_no_split(dataset, parts) == 1


@pytest.mark.parametrize(
    ("per_source", "test_source", "message"),
    [
        ({"A": [30, 60], "B": [10, 20]}, "C", r"matches no image; sources: 'A' \(90\), 'B' \(30\)"),
        (
            {"A": [30, 60], "B": [2, 20]},
            "B",
            r"COVID has 2 in test; with test_source 'B': \d+ train, \d+ val, 22 test images",
        ),
        ({"A": [30, 60]}, "A", "holds every image"),
    ],
)
def test_a_test_source_that_matches_nothing_or_starves_a_class_is_refused_with_counts(
    per_source: dict[str, list[int]], test_source: str, message: str
) -> None:
    """Issue item 3: the guards that stop a sweep before any trial."""
    dataset = two_source_dataset(per_source)
    with pytest.raises(DataError, match=message):
        make_splits(
            dataset,
            group_ids(dataset, "patient"),
            val_fraction=0.15,
            test_fraction=0.15,
            seed=0,
            test_source=test_source,
        )
