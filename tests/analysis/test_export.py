from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxrtune.analysis.evaluation import EvaluationSet
from cxrtune.analysis.experiment import SPLITS_FILE, read_experiment
from cxrtune.analysis.export import MODEL_FILE, ExportError, export_model, load_exported
from cxrtune.analysis.intervals import threshold_for_specificity
from cxrtune.analysis.leaderboard import Leaderboard, build_leaderboard
from cxrtune.trainables.checkpoints import read_checkpoint
from cxrtune.trainables.metrics import classification_metrics
from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD
from tests.analysis.test_leaderboard import CLASSES, SIZE, make_experiment


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Leaderboard]:
    """An experiment dir (t1, t2, t3 ranked; t4 failed) and its leaderboard."""
    experiment = make_experiment(tmp_path_factory.mktemp("export"))
    return experiment, build_leaderboard(read_experiment(experiment))


@pytest.fixture(scope="module")
def exported(built: tuple[Path, Leaderboard], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rank-1 trial (t1) exported."""
    return export_model(built[0], tmp_path_factory.mktemp("exported") / "model", rank=1)


def evaluation_set(experiment: Path) -> EvaluationSet:
    return EvaluationSet.load(read_experiment(experiment).dataset, experiment / SPLITS_FILE)


def test_exported_weights_are_state_dicts_that_load_with_weights_only(
    built: tuple[Path, Leaderboard], exported: Path
) -> None:
    weights = torch.load(exported / "t1.pt", weights_only=True)
    checkpoint = read_checkpoint(built[1].checkpoints["t1"])["model"]
    assert weights.keys() == checkpoint.keys()
    assert all(torch.equal(weights[key], checkpoint[key]) for key in weights)
    assert sorted(path.name for path in exported.iterdir()) == [MODEL_FILE, "t1.pt"]


def test_model_json_holds_config_classes_preprocessing_threshold_and_metrics(
    built: tuple[Path, Leaderboard], exported: Path
) -> None:
    experiment, leaderboard = built
    description = json.loads((exported / MODEL_FILE).read_text())
    row = leaderboard.ranked.set_index("trial_id").loc["t1"]
    assert description["format_version"] == 1
    [member] = description["members"]
    assert member["trial_id"] == "t1" and member["family"] == "baseline_cnn"
    assert member["config"] == json.loads((experiment / "t1_baseline_cnn/params.json").read_text())
    assert member["weights"] == "t1.pt"
    assert description["class_names"] == list(CLASSES)
    assert description["positive_class"] == "COVID"
    assert description["preprocessing"] == {
        "image_size": SIZE,
        "grayscale_mean": GRAY_MEAN,
        "grayscale_std": GRAY_STD,
    }
    assert description["threshold"] == row["threshold"]
    for name in ("val_covid_recall", "val_macro_auc", "test_macro_auc", "test_covid_recall"):
        assert description["metrics"][name] == row[name]
    assert description["source"]["selection"] == "rank 1"
    assert description["source"]["synthetic_data"] is True


def test_a_trial_is_exported_by_its_id(built: tuple[Path, Leaderboard], tmp_path: Path) -> None:
    model = load_exported(export_model(built[0], tmp_path / "t2", trial_id="t2"))
    assert [member["trial_id"] for member in model.description["members"]] == ["t2"]
    assert model.threshold == built[1].ranked.set_index("trial_id").loc["t2", "threshold"]
    assert model.class_names == CLASSES and model.positive_class == "COVID"


def test_an_ensemble_averages_its_members_and_takes_its_threshold_from_val(
    built: tuple[Path, Leaderboard], tmp_path: Path
) -> None:
    experiment, leaderboard = built
    model = load_exported(export_model(experiment, tmp_path / "ensemble", ensemble=2))
    assert [member["trial_id"] for member in model.description["members"]] == ["t1", "t2"]
    assert len(model.members) == 2
    members = [leaderboard.predictions[trial_id] for trial_id in ("t1", "t2")]
    images = evaluation_set(experiment).images["test"]
    averaged_test = np.mean([member["test"].probabilities for member in members], axis=0)
    np.testing.assert_allclose(model.predict_proba(images), averaged_test, atol=1e-5)
    assert not np.allclose(members[0]["test"].probabilities, averaged_test, atol=1e-5)

    val_labels = members[0]["val"].labels
    averaged_val = np.mean([member["val"].probabilities for member in members], axis=0)
    assert model.threshold == threshold_for_specificity(val_labels == 0, averaged_val[:, 0], 0.95)
    test_labels = members[0]["test"].labels
    expected = classification_metrics(test_labels, averaged_test, CLASSES, 0)
    metrics = model.description["metrics"]
    assert metrics["test_macro_auc"] == pytest.approx(expected["macro_auc"])
    assert metrics["test_covid_recall"] == pytest.approx(expected["covid_recall"])
    called = averaged_test[:, 0] >= model.threshold
    assert metrics["test_specificity_at_threshold"] == pytest.approx(
        (~called[test_labels != 0]).mean()
    )


def test_a_non_empty_out_dir_is_refused_and_left_as_it_was(
    built: tuple[Path, Leaderboard], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        export_model(built[0], tmp_path / "out", rank=1)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_an_empty_out_dir_is_filled(built: tuple[Path, Leaderboard], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    export_model(built[0], tmp_path / "out", rank=2)
    assert (tmp_path / "out" / MODEL_FILE).is_file()


def test_an_export_that_fails_midway_leaves_no_folder_behind(
    built: tuple[Path, Leaderboard], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_model(built[0], tmp_path / "out", ensemble=2)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_trial_id_is_an_error_naming_the_known_ones(
    built: tuple[Path, Leaderboard], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown trial id 'nope'; known: t1, t2, t3"):
        export_model(built[0], tmp_path / "out", trial_id="nope")


def test_a_failed_trial_cannot_be_exported(built: tuple[Path, Leaderboard], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"t4 failed.*NonFiniteLossError"):
        export_model(built[0], tmp_path / "out", trial_id="t4")


@pytest.mark.parametrize("selection", [{"rank": 0}, {"rank": 4}, {"ensemble": 4}])
def test_a_rank_or_ensemble_size_out_of_range_is_an_error_naming_the_count(
    built: tuple[Path, Leaderboard], tmp_path: Path, selection: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match="between 1 and 3"):
        export_model(built[0], tmp_path / "out", **selection)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("selection", [{}, {"rank": 1, "trial_id": "t1"}])
def test_exactly_one_selection_must_be_given(
    built: tuple[Path, Leaderboard], tmp_path: Path, selection: dict[str, Any]
) -> None:
    with pytest.raises(ExportError, match="exactly one of trial_id, rank or ensemble"):
        export_model(built[0], tmp_path / "out", **selection)


def copy_of(exported: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in exported.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def test_the_exported_folder_works_when_copied_elsewhere(exported: Path, tmp_path: Path) -> None:
    model = load_exported(copy_of(exported, tmp_path / "copied"))
    images = np.zeros((2, 1, SIZE, SIZE), dtype=np.uint8)
    np.testing.assert_array_equal(
        model.predict_proba(images), load_exported(exported).predict_proba(images)
    )


def test_a_folder_without_model_json_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"model\.json not found"):
        load_exported(tmp_path)


def test_a_model_json_that_is_not_json_is_an_error_naming_the_file(
    exported: Path, tmp_path: Path
) -> None:
    folder = copy_of(exported, tmp_path / "copied")
    (folder / MODEL_FILE).write_text('{"format_version": 1, "members": [')
    with pytest.raises(ExportError, match=rf"{folder / MODEL_FILE} is not valid JSON"):
        load_exported(folder)


def test_a_model_json_without_the_class_names_says_which_key_is_missing(
    exported: Path, tmp_path: Path
) -> None:
    folder = copy_of(exported, tmp_path / "copied")
    description = json.loads((folder / MODEL_FILE).read_text())
    del description["class_names"]
    (folder / MODEL_FILE).write_text(json.dumps(description))
    with pytest.raises(ExportError, match=r"lacks.*class_names"):
        load_exported(folder)


def test_a_missing_weights_file_is_an_error_naming_it(exported: Path, tmp_path: Path) -> None:
    folder = copy_of(exported, tmp_path / "copied")
    (folder / "t1.pt").unlink()
    with pytest.raises(ExportError, match=rf"{folder / 't1.pt'} is missing"):
        load_exported(folder)


def test_a_truncated_weights_file_is_an_error_naming_it(exported: Path, tmp_path: Path) -> None:
    folder = copy_of(exported, tmp_path / "copied")
    weights = folder / "t1.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ExportError, match=rf"{weights} is not the one exported"):
        load_exported(folder)
    # Without the recorded hash, loading itself finds the damage.
    description = json.loads((folder / MODEL_FILE).read_text())
    del description["members"][0]["sha256"]
    (folder / MODEL_FILE).write_text(json.dumps(description))
    with pytest.raises(ExportError, match=rf"{weights} cannot be loaded"):
        load_exported(folder)


def test_predict_proba_refuses_images_of_another_size(exported: Path) -> None:
    model = load_exported(exported)
    with pytest.raises(ValueError, match=f"uint8 N x 1 x {SIZE} x {SIZE}"):
        model.predict_proba(np.zeros((1, 1, SIZE * 2, SIZE * 2), dtype=np.uint8))


def test_a_null_threshold_means_no_image_is_called_positive(exported: Path, tmp_path: Path) -> None:
    folder = copy_of(exported, tmp_path / "copied")
    description = json.loads((folder / MODEL_FILE).read_text())
    description["threshold"] = None  # no threshold reached the target specificity on val
    (folder / MODEL_FILE).write_text(json.dumps(description))
    model = load_exported(folder)
    assert model.threshold == math.inf
    probabilities = model.predict_proba(np.zeros((1, 1, SIZE, SIZE), dtype=np.uint8))
    assert not (probabilities[:, model.positive_index] >= model.threshold).any()


@pytest.mark.parametrize("crafted", ["../../escaped", "/tmp/escaped", "sub/escaped", ".."])
def test_a_trial_id_that_is_a_path_is_refused_naming_it(
    built: tuple[Path, Leaderboard], tmp_path: Path, crafted: str
) -> None:
    """Item 7: the id from result.json names the weights file; it must not leave the folder."""
    import shutil

    from cxrtune.search.cli import EXIT_BAD_INPUT, main

    experiment = shutil.copytree(built[0], tmp_path / "experiment")
    results = experiment / "t1_baseline_cnn" / "result.json"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    results.write_text("".join(json.dumps({**row, "trial_id": crafted}) + "\n" for row in rows))
    with pytest.raises(ExportError, match=f"refusing trial id {crafted!r} of .*result.json"):
        export_model(experiment, tmp_path / "model", trial_id=crafted)
    out = tmp_path / "deep" / "er" / "model"
    assert main(["export", str(experiment), "--trial", crafted, "--out", str(out)]) == 2
    assert EXIT_BAD_INPUT == 2 and not out.exists()
    assert not list(tmp_path.rglob("escaped.pt")) and not Path("/tmp/escaped.pt").exists()
