from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrtune.trainables import synthetic

TINY_N = 40
TINY_SIZE = 32


def _files_by_name(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*.png")}


def _load_dataset(root: Path) -> tuple[list[np.ndarray], np.ndarray]:
    images, labels = [], []
    for label, class_name in enumerate(synthetic.CLASS_NAMES):
        for path in sorted((root / class_name).glob("*.png")):
            images.append(np.asarray(Image.open(path)))
            labels.append(label)
    return images, np.array(labels)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.write_synthetic_dataset(root, n=TINY_N, size=TINY_SIZE, seed=0)
    return root


def test_same_seed_writes_byte_identical_files(tmp_path: Path, tiny_dataset: Path) -> None:
    again = tmp_path / "again"
    synthetic.write_synthetic_dataset(again, n=TINY_N, size=TINY_SIZE, seed=0)
    first, second = _files_by_name(tiny_dataset), _files_by_name(again)
    assert len(first) == TINY_N
    assert first == second
    assert (tiny_dataset / synthetic.MARKER_FILE).read_bytes() == (
        again / synthetic.MARKER_FILE
    ).read_bytes()


def test_different_seeds_give_different_images(tmp_path: Path, tiny_dataset: Path) -> None:
    other = tmp_path / "other"
    synthetic.write_synthetic_dataset(other, n=TINY_N, size=TINY_SIZE, seed=1)
    first, second = _files_by_name(tiny_dataset), _files_by_name(other)
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


@pytest.mark.parametrize("n", [20, 37, 101, 400, 1200])
def test_class_counts_sum_to_n_with_covid_the_rare_tenth(n: int) -> None:
    counts = synthetic.class_counts(n)
    assert tuple(counts) == synthetic.CLASS_NAMES
    assert sum(counts.values()) == n
    assert min(counts.values()) >= 1
    assert counts["COVID"] == min(counts.values())
    assert abs(counts["COVID"] / n - 0.10) <= 1 / n
    assert synthetic.class_counts(n) == counts


def test_class_counts_refuses_too_few_images_for_every_class() -> None:
    with pytest.raises(ValueError, match="at least"):
        synthetic.class_counts(19)


def test_every_class_gets_a_folder_holding_its_counted_images(tiny_dataset: Path) -> None:
    counts = synthetic.class_counts(TINY_N)
    for class_name in synthetic.CLASS_NAMES:
        files = sorted(path.name for path in (tiny_dataset / class_name).iterdir())
        assert files == [f"{class_name}_{index:05d}.png" for index in range(counts[class_name])]


def test_images_are_8bit_grayscale_png_of_the_requested_size(tiny_dataset: Path) -> None:
    for path in tiny_dataset.rglob("*.png"):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "L"
            assert image.size == (TINY_SIZE, TINY_SIZE)


def test_render_image_returns_uint8_square_and_rejects_unknown_classes() -> None:
    pixels = synthetic.render_image("COVID", 48, np.random.default_rng(0))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (48, 48)
    with pytest.raises(ValueError, match="unknown class"):
        synthetic.render_image("Tuberculosis", 48, np.random.default_rng(0))


def test_refuses_a_non_empty_out_dir_and_leaves_it_untouched(tmp_path: Path) -> None:
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.write_synthetic_dataset(out_dir, n=20, size=TINY_SIZE)
    assert [path.name for path in out_dir.iterdir()] == ["keep.txt"]
    assert (out_dir / "keep.txt").read_text() == "precious"
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]


def test_an_existing_empty_out_dir_is_filled(tmp_path: Path) -> None:
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    counts = synthetic.write_synthetic_dataset(out_dir, n=20, size=TINY_SIZE)
    assert sum(counts.values()) == 20
    assert len(list(out_dir.rglob("*.png"))) == 20


def test_a_crash_midway_leaves_neither_out_dir_nor_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = synthetic.render_image
    calls = 0

    def render_then_crash(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise RuntimeError("simulated crash")
        return real_render(class_name, size, rng)

    monkeypatch.setattr(synthetic, "render_image", render_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic.write_synthetic_dataset(tmp_path / "data", n=20, size=TINY_SIZE)
    assert list(tmp_path.iterdir()) == []


def test_marker_file_says_synthetic_and_how_it_was_made(tiny_dataset: Path) -> None:
    text = (tiny_dataset / synthetic.MARKER_FILE).read_text(encoding="utf-8")
    assert "SYNTHETIC" in text
    assert f"n={TINY_N} size={TINY_SIZE} seed=0" in text


def test_progress_callback_counts_up_to_n_of_n(tmp_path: Path) -> None:
    reports: list[tuple[int, int]] = []
    synthetic.write_synthetic_dataset(
        tmp_path / "data",
        n=20,
        size=TINY_SIZE,
        progress=lambda done, total: reports.append((done, total)),
    )
    assert reports == [(done, 20) for done in range(1, 21)]


def test_mean_and_std_alone_do_not_separate_the_classes(tmp_path: Path) -> None:
    synthetic.write_synthetic_dataset(tmp_path / "data", n=400, size=64, seed=0)
    images, labels = _load_dataset(tmp_path / "data")
    features = np.array([[image.mean(), image.std()] for image in images])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    probabilities = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")
    macro_auc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert macro_auc < 0.75
