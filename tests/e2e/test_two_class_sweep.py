"""A binary dataset (COVID versus Normal, as many COVID collections are) through every command.

Issue item 0: such a set passed ``data inspect``, then every trial errored in its first
evaluation. One tiny sweep, run once through the command line, is shared by these tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxrtune.analysis.export import export_model, load_exported
from cxrtune.analysis.predict import predict_paths
from cxrtune.search.config import SEARCHABLE_METRICS
from cxrtune.trainables.synthetic import render_image

pytestmark = pytest.mark.slow
CLASSES = {"COVID": 30, "Normal": 60}
FAMILIES = {"baseline_cnn", "regularized_cnn", "vgg16"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_binary_manifest(root: Path) -> Path:
    """Synthetic COVID and Normal radiographs listed by a manifest, two images per patient."""
    rows = ["path,label,patient_id"]
    rng = np.random.default_rng(0)
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(render_image(name, 32, rng)).save(root / name / f"{index:03d}.png")
            rows.append(f"{name}/{index:03d}.png,{name},{name}-{index // 2}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def binary_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The experiment dir of a three-trial, two-epoch sweep of the binary set, and its output."""
    manifest = write_binary_manifest(tmp_path_factory.mktemp("binary"))
    storage = tmp_path_factory.mktemp("results")
    result = run_cli(
        "sweep",
        "--data",
        str(manifest),
        "--name",
        "binary",
        *("--set", f"storage_path={storage}"),
        *("--set", "image_size=32", "--set", "space=quick", "--set", "num_samples=3"),
        *("--set", "max_epochs=2", "--set", "grace_period=1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return storage / "binary", result.stdout + result.stderr


def test_a_two_class_sweep_ranks_every_family_with_the_binary_auc(
    binary_sweep: tuple[Path, str],
) -> None:
    experiment, output = binary_sweep
    assert "failed" not in output and "Traceback" not in output
    assert "least populated" not in output and "UserWarning" not in output
    leaderboard = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial_id": str})
    assert set(leaderboard["family"]) == FAMILIES
    assert leaderboard["rank"].tolist() == [1, 2, 3]
    for column in ("val_macro_auc", "test_macro_auc", "test_macro_auc_low", "test_macro_auc_high"):
        assert leaderboard[column].between(0, 1).all(), column
    for trial in leaderboard.itertuples():
        (folder,) = experiment.glob(f"{trial.trial_id}_*")
        saved = json.loads((folder / "evaluation.json").read_text())["test"]
        labels, probabilities = np.array(saved["labels"]), np.array(saved["probabilities"])
        assert probabilities.shape[1] == 2
        assert trial.test_macro_auc == roc_auc_score(labels == 0, probabilities[:, 0])


def test_every_searchable_metric_is_reported_for_two_classes(
    binary_sweep: tuple[Path, str],
) -> None:
    """No metric a sweep may optimise or schedule on is undefined for two classes."""
    experiment, _ = binary_sweep
    results = list(experiment.glob("*/result.json"))
    assert len(results) == 3
    for path in results:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for metric in SEARCHABLE_METRICS:
            assert all(math.isfinite(row[metric]) for row in rows), (path.parent.name, metric)


def test_a_two_class_report_draws_one_roc_curve_and_the_confusion_matrix(
    binary_sweep: tuple[Path, str], tmp_path: Path
) -> None:
    experiment, _ = binary_sweep
    result = run_cli("report", str(experiment), "--top", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "report.html").read_text()
    assert "ROC curve of COVID against Normal on test" in html
    assert len(list(tmp_path.glob("trial_01_*_roc.png"))) == 1
    assert len(list(tmp_path.glob("trial_01_*_confusion.png"))) == 1


@pytest.mark.parametrize("selection", [{"rank": 1}, {"ensemble": 2}], ids=["rank", "ensemble"])
def test_an_exported_two_class_model_predicts_the_leaderboard_numbers(
    binary_sweep: tuple[Path, str], tmp_path: Path, selection: dict[str, int]
) -> None:
    """What ``cxrtune export`` and ``cxrtune predict`` run (the CLI is tested on four classes)."""
    experiment, _ = binary_sweep
    model = load_exported(export_model(experiment, tmp_path / "model", **selection))
    described = json.loads((tmp_path / "model" / "model.json").read_text())
    splits = pd.read_csv(experiment / "splits.csv", keep_default_na=False)
    test = splits[splits["split"] == "test"]
    # The dataset's root is the manifest; its paths are relative to the manifest's folder.
    manifest_folder = Path(json.loads((experiment / "dataset.json").read_text())["root"]).parent
    table, bad_files = predict_paths(model, [manifest_folder / path for path in test["path"]])
    assert not bad_files
    assert list(table.columns) == ["path", "COVID", "Normal", "predicted_class", "covid_call"]
    is_covid = (test["label"] == "COVID").to_numpy()
    auc = roc_auc_score(is_covid, table["COVID"])
    assert auc == pytest.approx(described["metrics"]["test_macro_auc"], abs=1e-4)
    threshold = described["threshold"]
    expected_calls = table["COVID"] >= (math.inf if threshold is None else threshold)
    assert (table["covid_call"] == expected_calls).all()
