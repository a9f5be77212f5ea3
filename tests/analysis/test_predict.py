from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrtune.analysis.experiment import SPLITS_FILE, read_experiment
from cxrtune.analysis.export import ExportedModel, export_model, load_exported
from cxrtune.analysis.leaderboard import Leaderboard, build_leaderboard
from cxrtune.analysis.predict import predict_paths, prediction_table
from cxrtune.trainables.data import read_cache
from cxrtune.trainables.metrics import classification_metrics
from cxrtune.trainables.splits import read_splits
from tests.analysis.test_leaderboard import CLASSES, SIZE, make_experiment
from tests.conftest import write_png
from tests.trainables.test_dicom import write_dicom


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Leaderboard]:
    experiment = make_experiment(tmp_path_factory.mktemp("predict"))
    return experiment, build_leaderboard(read_experiment(experiment))


@pytest.fixture(scope="module")
def model(
    built: tuple[Path, Leaderboard], tmp_path_factory: pytest.TempPathFactory
) -> ExportedModel:
    return load_exported(export_model(built[0], tmp_path_factory.mktemp("model") / "m", rank=1))


def write_test_split(experiment: Path, root: Path) -> list[str]:
    """The experiment's cached test images as PNG files under ``root``; their relative paths."""
    dataset = read_cache(Path(read_experiment(experiment).dataset.cache_path))
    test = read_splits(dataset, experiment / SPLITS_FILE).test
    for index in test:
        write_png(root / dataset.paths[index], dataset.images[index, 0])
    return [dataset.paths[index] for index in test]


@pytest.mark.parametrize("trial_id", ["t1", "t2"])  # a plain CNN, and one with batch norm
def test_an_exported_model_reproduces_the_leaderboards_test_predictions_from_image_files(
    built: tuple[Path, Leaderboard], tmp_path: Path, trial_id: str
) -> None:
    experiment, leaderboard = built
    model = load_exported(export_model(experiment, tmp_path / "model", trial_id=trial_id))
    relative = write_test_split(experiment, tmp_path / "images")

    table, bad = predict_paths(model, [tmp_path / "images"])

    assert bad == []
    by_path = table.set_index("path").loc[[str(tmp_path / "images" / path) for path in relative]]
    probabilities = by_path[list(CLASSES)].to_numpy()
    expected = leaderboard.predictions[trial_id]["test"]
    np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-5)
    # The leaderboard rounds its probabilities to 6 places before any metric.
    metrics = classification_metrics(expected.labels, np.round(probabilities, 6), CLASSES, 0)
    row = leaderboard.ranked.set_index("trial_id").loc[trial_id]
    assert metrics["macro_auc"] == pytest.approx(row["test_macro_auc"], abs=1e-12)
    assert metrics["covid_recall"] == row["test_covid_recall"]


def test_unreadable_files_are_reported_with_a_reason_and_the_good_images_still_predicted(
    model: ExportedModel, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    good = [
        write_png(tmp_path / "in" / name, rng.integers(0, 256, (40, 30), np.uint8))
        for name in ("a.png", "sub/b.jpg")
    ]
    corrupt = tmp_path / "in" / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])
    text = tmp_path / "in" / "notes.png"
    text.write_text("patient 12, chest PA\n")
    (tmp_path / "in" / "readme.txt").write_text("not an image name, so not an input")

    table, bad = predict_paths(model, [tmp_path / "in", tmp_path / "absent.png"])

    assert sorted(table["path"]) == sorted(str(path) for path in good)
    reasons = dict(bad)
    assert set(reasons) == {str(corrupt), str(text), str(tmp_path / "absent.png")}
    assert "truncated" in reasons[str(corrupt)]
    assert "not an image" in reasons[str(text)]
    assert reasons[str(tmp_path / "absent.png")] == "file not found"
    assert list(table.columns) == ["path", *CLASSES, "predicted_class", "covid_call"]
    np.testing.assert_allclose(table[list(CLASSES)].sum(axis=1), 1.0)


def test_a_dicom_file_is_predicted_like_the_same_pixels_in_a_png(
    model: ExportedModel, tmp_path: Path
) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (24, 24), np.uint8)
    pixels[0, :2] = (0, 255)  # spanning 0..255, an 8-bit DICOM decodes to the same pixels
    dicom = write_dicom(tmp_path / "chest.dcm", pixels)
    png = write_png(tmp_path / "chest.png", pixels)

    table, bad = predict_paths(model, [dicom, png])

    assert bad == []
    probabilities = table.set_index("path")[list(CLASSES)]
    np.testing.assert_array_equal(probabilities.loc[str(dicom)], probabilities.loc[str(png)])


def test_images_of_any_size_are_squashed_to_the_models_size_as_in_training(
    model: ExportedModel, tmp_path: Path
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (50, 70), np.uint8)
    path = write_png(tmp_path / "wide.png", pixels)
    squashed = np.asarray(
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=3.0)
    )
    table, _ = predict_paths(model, [path])
    np.testing.assert_array_equal(
        table[list(CLASSES)].to_numpy(), model.predict_proba(squashed[None, None])
    )


def test_an_empty_folder_gives_an_empty_table(model: ExportedModel, tmp_path: Path) -> None:
    table, bad = predict_paths(model, [tmp_path])
    assert table.empty and bad == []
    assert list(table.columns) == ["path", *CLASSES, "predicted_class", "covid_call"]


def test_the_covid_call_is_the_positive_class_probability_at_or_above_the_threshold() -> None:
    model = ExportedModel(
        directory=Path("unused"),
        members=(),
        class_names=("Normal", "COVID", "Pneumonia"),
        positive_index=1,
        threshold=0.3,
        image_size=SIZE,
        description={},
    )
    probabilities = np.array([[0.5, 0.3, 0.2], [0.7, 0.29, 0.01], [0.1, 0.2, 0.7]])
    table = prediction_table(model, [Path("a"), Path("b"), Path("c")], probabilities)
    expected = pd.DataFrame(
        {
            "path": ["a", "b", "c"],
            "Normal": [0.5, 0.7, 0.1],
            "COVID": [0.3, 0.29, 0.2],
            "Pneumonia": [0.2, 0.01, 0.7],
            "predicted_class": ["Normal", "Normal", "Pneumonia"],
            "covid_call": [True, False, False],
        }
    )
    pd.testing.assert_frame_equal(table, expected)
