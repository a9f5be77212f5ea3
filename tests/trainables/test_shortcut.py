"""The shortcut check (issue item 4) on synthetic sets where the answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrtune.trainables.data import ingest
from cxrtune.trainables.shortcut import check_shortcut
from tests.conftest import write_png

SIZE = 32


def chest_like(rng: np.random.Generator, count: int) -> np.ndarray:
    """Noisy images of one distribution, ``count x 1 x SIZE x SIZE`` uint8."""
    base = np.linspace(60, 180, SIZE)[None, None, None, :]
    noise = rng.normal(0, 25, (count, 1, SIZE, SIZE))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def two_sources(*, marked: bool, confounded: bool, seed: int = 0):
    """80 images per source; source A may carry a bright corner marker, and may be mostly
    COVID (label 0) while source B is mostly Normal (label 1)."""
    rng = np.random.default_rng(seed)
    images = chest_like(rng, 160)
    sources = np.array(["hospital A"] * 80 + ["hospital B"] * 80)
    if marked:
        images[:80, 0, :6, :6] = 255
    if confounded:
        labels = np.array([0] * 70 + [1] * 10 + [0] * 10 + [1] * 70)
    else:
        labels = np.tile([0, 1], 80)
    return images, labels, tuple(sources)


def test_a_marked_source_holding_mostly_one_class_warns() -> None:
    images, labels, sources = two_sources(marked=True, confounded=True)
    check = check_shortcut(images, labels, sources)
    assert check is not None and check.warns
    assert check.balanced_accuracy > 0.95 and check.chance == 0.5
    assert check.cramers_v == pytest.approx(0.75)
    warning = check.warning()
    assert "hospital A, hospital B" in warning and "test_source" in warning
    assert "balanced" in warning


def test_sources_that_look_alike_and_share_their_class_mix_do_not_warn() -> None:
    images, labels, sources = two_sources(marked=False, confounded=False)
    check = check_shortcut(images, labels, sources)
    assert check is not None and not check.warns
    assert check.balanced_accuracy < 0.7 and check.cramers_v < 0.1
    assert check.warning() == ""


def test_a_visible_source_alone_or_a_confounded_label_alone_does_not_warn() -> None:
    for marked, confounded in ((True, False), (False, True)):
        images, labels, sources = two_sources(marked=marked, confounded=confounded)
        check = check_shortcut(images, labels, sources)
        assert check is not None and not check.warns


def test_fewer_than_two_usable_sources_run_no_probe() -> None:
    images, labels, _ = two_sources(marked=True, confounded=True)
    sources = ("hospital A",) * 157 + ("tiny",) * 3
    assert check_shortcut(images, labels, sources) is None


def test_the_ingest_report_says_so_in_plain_words(tmp_path: Path) -> None:
    """`data inspect` and every sweep print the ingest report, warning included."""
    images, labels, sources = two_sources(marked=True, confounded=True)
    rows = ["path,label,source"]
    for index, (image, label, source) in enumerate(zip(images, labels, sources, strict=True)):
        write_png(tmp_path / "scans" / f"{index}.png", image[0])
        rows.append(f"scans/{index}.png,{('COVID', 'Normal')[label]},{source}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    report = ingest(tmp_path / "m.csv", SIZE, cache_dir=tmp_path / "cache").report
    text = report.to_text()
    assert "Shortcut check over sources hospital A (80), hospital B (80)" in text
    assert "SHORTCUT RISK" in text and "--test-source" in text
    assert report.shortcut_check() == type(report).from_json(report.to_json()).shortcut_check()
