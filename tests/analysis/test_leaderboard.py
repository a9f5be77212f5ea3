from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import recall_score, roc_auc_score, roc_curve

from cxrtune.analysis.experiment import (
    DatasetInfo,
    ExperimentError,
    Predictions,
    best_epoch_row,
    read_experiment,
)
from cxrtune.analysis.intervals import stratified_bootstrap_ci
from cxrtune.analysis.leaderboard import (
    COLUMNS,
    HYPERPARAMETERS,
    TEST_COLUMNS,
    Leaderboard,
    build_leaderboard,
    format_leaderboard,
    held_out_metrics,
    write_leaderboard,
)
from cxrtune.trainables.checkpoints import save_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.data import Dataset, write_cache
from cxrtune.trainables.models import create_model
from cxrtune.trainables.splits import stratified_split, write_splits

CLASSES = ("COVID", "Normal", "Pneumonia")
SIZE = 16
# Fewer bootstrap resamples than a sweep file may ask for, to keep the tests quick.
RESAMPLES = 50


def make_experiment(root: Path) -> Path:
    """An experiment dir as a sweep leaves it: three finished trials and one that errored."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [20, 40, 40])
    dataset = Dataset(
        images=rng.integers(0, 256, (100, 1, SIZE, SIZE), dtype=np.uint8),
        labels=labels,
        class_names=CLASSES,
        paths=tuple(f"{CLASSES[label]}/{i}.png" for i, label in enumerate(labels)),
    )
    experiment = root / "exp"
    experiment.mkdir()
    cache = root / "cache.npz"
    write_cache(dataset, cache)
    splits = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    write_splits(dataset, splits, experiment / "splits.csv")
    # No target_specificity: an experiment from before the key, so the default 0.95 holds.
    (experiment / "sweep.yaml").write_text(
        f"scheduler_metric: val_macro_auc\nweights: none\nbootstrap_resamples: {RESAMPLES}\n"
    )
    DatasetInfo(
        root=str(root / "data"),
        synthetic=True,
        layout="imagefolder",
        cache_path=str(cache),
        image_size=SIZE,
        class_names=list(CLASSES),
        positive_class="COVID",
        split_counts={"train": {"COVID": 12}, "val": {"COVID": 4}, "test": {"COVID": 4}},
    ).write(experiment / "dataset.json")

    # (trial, family, per-epoch (val_covid_recall, val_macro_auc))
    trials = [
        ("t1", "baseline_cnn", [(0.50, 0.70), (0.75, 0.80), (0.70, 0.78)]),
        ("t2", "regularized_cnn", [(0.25, 0.60), (0.50, 0.90)]),
        ("t3", "baseline_cnn", [(0.25, 0.65)]),
    ]
    for trial_id, family, epochs in trials:
        directory = experiment / f"{trial_id}_{family}"
        directory.mkdir()
        config = TrialConfig(family=family, lr=1e-3, batch_size=8, imbalance="none", max_epochs=3)
        (directory / "params.json").write_text(json.dumps(config.to_dict()))
        torch.manual_seed(len(trial_id) + len(family))
        model = create_model(config, len(CLASSES), SIZE)
        rows = []
        for epoch, (recall, auc) in enumerate(epochs, start=1):
            name = f"checkpoint_{epoch - 1:06d}"
            (directory / name).mkdir()
            save_checkpoint(
                directory / name,
                model=model,
                optimizer=torch.optim.Adam(model.parameters()),
                config=config,
                epoch=epoch,
                generator=torch.Generator(),
                class_names=CLASSES,
                image_size=SIZE,
                metrics={},
            )
            rows.append(
                {
                    "trial_id": trial_id,
                    "epoch": epoch,
                    "val_covid_recall": recall,
                    "val_covid_recall_at_spec": recall * 0.8,
                    "val_macro_auc": auc,
                    "checkpoint_dir_name": name,
                }
            )
        (directory / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))

    broken = experiment / "t4_vgg16"
    broken.mkdir()
    (broken / "params.json").write_text(json.dumps({"family": "vgg16", "lr": 0.5}))
    (broken / "error.txt").write_text(
        "Traceback (most recent call last):\n  ...\nNonFiniteLossError: training loss became nan\n"
    )
    return experiment


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Leaderboard]:
    """One experiment dir and its leaderboard, for the tests that only read them."""
    experiment = make_experiment(tmp_path_factory.mktemp("built"))
    return experiment, build_leaderboard(read_experiment(experiment))


def saved_predictions(trial_folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    saved = json.loads((trial_folder / "evaluation.json").read_text())
    return {
        split: (np.array(saved[split]["labels"]), np.array(saved[split]["probabilities"]))
        for split in ("val", "test")
    }


def test_trials_rank_on_the_validation_metrics_of_their_best_epoch(
    built: tuple[Path, Leaderboard],
) -> None:
    ranked = built[1].ranked
    assert list(ranked.columns) == list(COLUMNS)
    # Best epochs by val_macro_auc: t1 epoch 2 (0.75, 0.80), t2 epoch 2 (0.50, 0.90),
    # t3 epoch 1 (0.25, 0.65).
    assert ranked["trial_id"].tolist() == ["t1", "t2", "t3"]
    assert ranked["best_epoch"].tolist() == [2, 2, 1]
    assert ranked["epochs"].tolist() == [3, 2, 1]
    assert ranked.loc[0, "val_covid_recall"] == 0.75
    assert ranked.loc[0, "val_covid_recall_at_spec"] == pytest.approx(0.6)
    assert not ranked["pretrained"].any()


def test_trials_rank_by_the_sweeps_own_objectives(tmp_path: Path) -> None:
    """Issue item 1: the leaderboard ranks by the sweep file's ``objectives``.

    Single-objective on val_macro_auc, t2 (0.90) comes before t1 (0.80), though t1
    leads on both recall columns.
    """
    experiment = make_experiment(tmp_path)
    with (experiment / "sweep.yaml").open("a") as sweep:
        sweep.write("objectives: [val_macro_auc]\n")
    ranked = build_leaderboard(read_experiment(experiment), evaluate_test=False).ranked
    assert ranked["trial_id"].tolist() == ["t2", "t1", "t3"]
    assert list(ranked.columns) == list(COLUMNS)

    with (experiment / "sweep.yaml").open("a") as sweep:
        sweep.write("objectives: [val_accuracy]\n")
    ranked = build_leaderboard(read_experiment(experiment), evaluate_test=False).ranked
    assert list(ranked.columns) == [*COLUMNS, "val_accuracy"]
    assert ranked["val_accuracy"].isna().all()  # never reported by these trials


def test_metrics_come_before_hyperparameters_and_test_columns_keep_their_order() -> None:
    """The numbers that decide are read first; new test columns go after the old ones."""
    assert COLUMNS[: COLUMNS.index("val_macro_auc") + 1] == (
        "rank",
        "pareto_front",
        "trial_id",
        "family",
        "pretrained",
        "epochs",
        "best_epoch",
        "val_covid_recall_at_spec",
        "val_covid_recall",
        "val_macro_auc",
    )
    assert COLUMNS[-len(HYPERPARAMETERS) :] == HYPERPARAMETERS
    assert TEST_COLUMNS == (
        "test_covid_recall",
        "test_macro_auc",
        "test_accuracy",
        "test_covid_recall_low",
        "test_covid_recall_high",
        "test_macro_auc_low",
        "test_macro_auc_high",
        "threshold",
        "test_covid_recall_at_threshold",
        "test_specificity_at_threshold",
        "test_covid_recall_at_threshold_low",
        "test_covid_recall_at_threshold_high",
    )


def test_the_chosen_checkpoint_is_evaluated_on_val_and_test(
    built: tuple[Path, Leaderboard],
) -> None:
    experiment, leaderboard = built
    saved = json.loads((experiment / "t1_baseline_cnn" / "evaluation.json").read_text())
    assert saved["checkpoint"] == "checkpoint_000001"
    predictions = saved_predictions(experiment / "t1_baseline_cnn")
    splits = pd.read_csv(experiment / "splits.csv")
    for split, (labels, probabilities) in predictions.items():
        expected = splits.loc[splits["split"] == split, "label"].map(CLASSES.index).to_numpy()
        assert labels.tolist() == expected.tolist()
        assert probabilities.shape == (len(labels), len(CLASSES))
    labels, probabilities = predictions["test"]
    expected_auc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    row = leaderboard.ranked.set_index("trial_id").loc["t1"]
    assert row["test_macro_auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert 0.0 <= row["test_accuracy"] <= 1.0


def test_intervals_match_a_bootstrap_of_scikit_learn_metrics_on_the_saved_test_predictions(
    built: tuple[Path, Leaderboard],
) -> None:
    experiment, leaderboard = built
    rows = leaderboard.ranked.set_index("trial_id")
    for trial_id, folder in (("t1", "t1_baseline_cnn"), ("t2", "t2_regularized_cnn")):
        labels, probabilities = saved_predictions(experiment / folder)["test"]
        recall = stratified_bootstrap_ci(
            labels,
            probabilities,
            lambda y, p: recall_score(y, p.argmax(axis=1), labels=[0], average="macro"),
            resamples=RESAMPLES,
        )
        auc = stratified_bootstrap_ci(
            labels,
            probabilities,
            lambda y, p: roc_auc_score(y, p, multi_class="ovr", average="macro"),
            resamples=RESAMPLES,
        )
        row = rows.loc[trial_id]
        assert (row["test_covid_recall_low"], row["test_covid_recall_high"]) == recall
        assert (row["test_macro_auc_low"], row["test_macro_auc_high"]) == pytest.approx(auc)
        assert row["test_macro_auc_low"] < row["test_macro_auc_high"]


def test_the_threshold_is_chosen_on_val_and_its_recall_and_specificity_measured_on_test(
    built: tuple[Path, Leaderboard],
) -> None:
    experiment, leaderboard = built
    rows = leaderboard.ranked.set_index("trial_id")
    for trial_id, folder in (("t1", "t1_baseline_cnn"), ("t2", "t2_regularized_cnn")):
        predictions = saved_predictions(experiment / folder)
        val_labels, val_probabilities = predictions["val"]
        false_positive_rate, _, thresholds = roc_curve(
            val_labels == 0, val_probabilities[:, 0], drop_intermediate=False
        )
        threshold = thresholds[1 - false_positive_rate >= 0.95].min()  # the default target
        test_labels, test_probabilities = predictions["test"]
        called = test_probabilities[:, 0] >= threshold
        row = rows.loc[trial_id]
        assert row["threshold"] == threshold
        assert row["test_covid_recall_at_threshold"] == recall_score(test_labels == 0, called)
        assert row["test_specificity_at_threshold"] == recall_score(test_labels != 0, ~called)


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_the_test_columns_are_defined_for_two_three_and_four_classes(classes: int) -> None:
    """Binary sets (COVID versus Normal) and three-class ones get every test column too."""
    rng = np.random.default_rng(classes)
    names = ["COVID", "Normal", "Pneumonia", "Lung Opacity"][:classes]
    predictions = {}
    for split in ("val", "test"):
        labels = np.repeat(np.arange(classes), 10)
        probabilities = rng.dirichlet(np.ones(classes), len(labels)) + np.eye(classes)[labels]
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        predictions[split] = Predictions(labels, probabilities)
    columns = held_out_metrics(predictions, names, 0, resamples=RESAMPLES)
    assert all(math.isfinite(columns[name]) for name in TEST_COLUMNS), columns
    test = predictions["test"]
    if classes == 2:
        expected = roc_auc_score(test.labels == 0, test.probabilities[:, 0])
    else:
        expected = roc_auc_score(test.labels, test.probabilities, multi_class="ovr")
    assert columns["test_macro_auc"] == pytest.approx(expected)
    assert (
        columns["test_macro_auc_low"] <= columns["test_macro_auc"] <= columns["test_macro_auc_high"]
    )


def test_a_sweep_file_sets_the_target_specificity(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    sweep = experiment / "sweep.yaml"
    sweep.write_text(sweep.read_text() + "target_specificity: 0.5\n")
    leaderboard = build_leaderboard(read_experiment(experiment))
    val_labels, val_probabilities = saved_predictions(experiment / "t1_baseline_cnn")["val"]
    false_positive_rate, _, thresholds = roc_curve(
        val_labels == 0, val_probabilities[:, 0], drop_intermediate=False
    )
    row = leaderboard.ranked.set_index("trial_id").loc["t1"]
    assert row["threshold"] == thresholds[1 - false_positive_rate >= 0.5].min()


def test_cached_evaluations_are_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = make_experiment(tmp_path)
    first = build_leaderboard(read_experiment(experiment))
    import cxrtune.analysis.evaluation as evaluation

    monkeypatch.setattr(
        evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("re-evaluated")
    )
    second = build_leaderboard(read_experiment(experiment))
    pd.testing.assert_frame_equal(first.ranked, second.ranked)


def test_an_evaluation_of_another_checkpoint_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = make_experiment(tmp_path)
    build_leaderboard(read_experiment(experiment))
    cache = experiment / "t2_regularized_cnn" / "evaluation.json"
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({**saved, "checkpoint": "checkpoint_000000"}))
    import cxrtune.analysis.evaluation as evaluation

    evaluated: list[str] = []
    evaluate = evaluation.evaluate_checkpoint

    def counting_evaluate(checkpoint: Path, *args: Any, **kwargs: Any) -> Any:
        evaluated.append(checkpoint.parent.name)
        return evaluate(checkpoint, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", counting_evaluate)
    build_leaderboard(read_experiment(experiment))
    assert evaluated == ["t2_regularized_cnn"]
    assert json.loads(cache.read_text())["checkpoint"] == "checkpoint_000001"


def test_building_a_leaderboard_leaves_the_reported_results_untouched(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    results = sorted(experiment.glob("*/result.json"))
    before = [path.read_text() for path in results]
    build_leaderboard(read_experiment(experiment))
    assert [path.read_text() for path in results] == before
    reported = {key for text in before for line in text.splitlines() for key in json.loads(line)}
    assert not [key for key in reported if key.startswith("test_")]


def test_tables_show_each_interval_beside_its_estimate(built: tuple[Path, Leaderboard]) -> None:
    leaderboard = built[1]
    row = leaderboard.ranked.iloc[0]
    merged = (
        f"{row['test_macro_auc']:.3f} "
        f"[{row['test_macro_auc_low']:.3f}, {row['test_macro_auc_high']:.3f}]"
    )
    for style in ("table", "md"):
        text = format_leaderboard(leaderboard, style=style)
        assert merged in text
        assert "test_macro_auc_low" not in text and "test_covid_recall_high" not in text
    csv = pd.read_csv(io.StringIO(format_leaderboard(leaderboard, style="csv")))
    assert list(csv.columns) == list(COLUMNS)
    assert csv.loc[0, "test_macro_auc_low"] == pytest.approx(row["test_macro_auc_low"], rel=1e-12)


def test_without_test_evaluation_the_test_columns_are_empty(tmp_path: Path) -> None:
    leaderboard = build_leaderboard(read_experiment(make_experiment(tmp_path)), evaluate_test=False)
    assert leaderboard.ranked[list(TEST_COLUMNS)].isna().all(axis=None)
    assert not list((tmp_path / "exp").glob("*/evaluation.json"))
    row_text = next(line for line in format_leaderboard(leaderboard).splitlines() if " t1 " in line)
    assert "nan" not in row_text.lower() and " - " in row_text


def test_errored_trials_are_listed_apart_with_their_error(built: tuple[Path, Leaderboard]) -> None:
    leaderboard = built[1]
    assert leaderboard.failed["trial_id"].tolist() == ["t4"]
    assert "NonFiniteLossError" in leaderboard.failed.loc[0, "error"]
    text = format_leaderboard(leaderboard)
    assert "1 trial(s) failed" in text and "NonFiniteLossError: training loss became nan" in text


def test_the_leaderboard_files_are_written(built: tuple[Path, Leaderboard]) -> None:
    experiment, leaderboard = built
    write_leaderboard(leaderboard, experiment)
    table = pd.read_csv(experiment / "leaderboard.csv")
    assert table["trial_id"].tolist() == ["t1", "t2", "t3"]
    markdown = (experiment / "leaderboard.md").read_text()
    assert markdown.count("\n| 1 ") == 1 and "SYNTHETIC" in markdown
    assert "| t4 " in markdown and "NonFiniteLossError: training loss became nan" in markdown


def test_the_header_says_the_data_are_synthetic(tmp_path: Path) -> None:
    leaderboard = build_leaderboard(read_experiment(make_experiment(tmp_path)), evaluate_test=False)
    assert "SYNTHETIC" in leaderboard.header


def test_the_header_names_an_external_test_source_and_its_size(tmp_path: Path) -> None:
    """Issue item 3: "test = external source NAME (n images)"."""
    experiment = make_experiment(tmp_path)
    info = DatasetInfo.read(experiment / "dataset.json")
    info = dataclasses.replace(info, test_source="Hospital B")
    info.write(experiment / "dataset.json")
    leaderboard = build_leaderboard(read_experiment(experiment), evaluate_test=False)
    assert "test = external source Hospital B (4 images)" in leaderboard.header


def epochs_table(values: list[float]) -> pd.DataFrame:
    """One row per epoch with its val macro AUC and the checkpoint Ray wrote with it."""
    return pd.DataFrame(
        {
            "epoch": range(1, len(values) + 1),
            "val_macro_auc": values,
            "checkpoint_dir_name": [f"checkpoint_{index:06d}" for index in range(len(values))],
        }
    )


def test_best_epoch_skips_epochs_whose_checkpoint_is_gone() -> None:
    results = epochs_table([0.7, 0.9, 0.8])
    kept = {"checkpoint_000000", "checkpoint_000002"}
    best = best_epoch_row(results, "val_macro_auc", "max", kept)
    assert best is not None and best["epoch"] == 3


def test_best_epoch_of_tied_epochs_is_the_latest_kept_one_item_2() -> None:
    """Issue item 2: Ray keeps the latest of equal scores, so the latest tied epoch wins."""
    results = epochs_table([0.6, 1.0, 1.0, 1.0, 0.9])
    every = set(results["checkpoint_dir_name"])
    assert best_epoch_row(results, "val_macro_auc", "max", every)["epoch"] == 4
    # checkpoints_to_keep 1: the latest tied epoch and the latest epoch are left.
    kept = {"checkpoint_000003", "checkpoint_000004"}
    assert best_epoch_row(results, "val_macro_auc", "max", kept)["epoch"] == 4
    # Whatever Ray deleted, the choice is a checkpoint that still exists.
    kept = {"checkpoint_000001", "checkpoint_000004"}
    assert best_epoch_row(results, "val_macro_auc", "max", kept)["epoch"] == 2
    losses = epochs_table([0.5, 0.3, 0.3]).rename(columns={"val_macro_auc": "val_loss"})
    assert (
        best_epoch_row(losses, "val_loss", "min", set(losses["checkpoint_dir_name"]))["epoch"] == 3
    )


def test_best_epoch_without_a_kept_checkpoint_is_none() -> None:
    results = epochs_table([0.7, 0.9])
    assert best_epoch_row(results, "val_macro_auc", "max", set()) is None
    assert (
        best_epoch_row(
            results.drop(columns="checkpoint_dir_name"),
            "val_macro_auc",
            "max",
            {"checkpoint_000000"},
        )
        is None
    )


def test_best_epoch_of_a_trial_without_results_is_none() -> None:
    assert best_epoch_row(pd.DataFrame(), "val_macro_auc", "max", {"checkpoint_000000"}) is None


def test_a_tie_chooses_the_checkpoint_ray_kept_and_evaluates_it_item_2(tmp_path: Path) -> None:
    """Issue item 2: tied epochs whose earliest checkpoint Ray deleted still get test columns."""
    experiment = make_experiment(tmp_path)
    trial = experiment / "t1_baseline_cnn"
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    for row in rows:
        row["val_macro_auc"] = 0.8
    (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("checkpoint_000000", "checkpoint_000001"):
        shutil.rmtree(trial / name)  # checkpoints_to_keep 1: Ray kept the latest of the tie
    leaderboard = build_leaderboard(read_experiment(experiment))
    row = leaderboard.ranked.set_index("trial_id").loc["t1"]
    assert row["best_epoch"] == 3
    assert row[list(TEST_COLUMNS)].notna().all()
    assert leaderboard.checkpoints["t1"] == trial / "checkpoint_000002"
    assert json.loads((trial / "evaluation.json").read_text())["checkpoint"] == "checkpoint_000002"


def test_a_trial_whose_checkpoints_are_gone_is_listed_apart_with_the_reason_item_2(
    tmp_path: Path,
) -> None:
    """Issue item 2: no NaN test columns for a trial without a checkpoint to evaluate."""
    experiment = make_experiment(tmp_path)
    shutil.rmtree(experiment / "t3_baseline_cnn" / "checkpoint_000000")
    leaderboard = build_leaderboard(read_experiment(experiment))
    assert leaderboard.ranked["trial_id"].tolist() == ["t1", "t2"]
    assert leaderboard.ranked[list(TEST_COLUMNS)].notna().all(axis=None)
    failed = leaderboard.failed.set_index("trial_id")["error"]
    assert "checkpoint_000000 is missing from" in failed["t3"]
    assert "t3" not in leaderboard.checkpoints
    text = format_leaderboard(leaderboard)
    assert "t3 baseline_cnn: no checkpoint left: checkpoint_000000 is missing" in text


def test_a_chosen_checkpoint_that_cannot_be_read_is_listed_apart_item_2(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    (experiment / "t2_regularized_cnn" / "checkpoint_000001" / "checkpoint.pt").unlink()
    leaderboard = build_leaderboard(read_experiment(experiment))
    assert leaderboard.ranked["trial_id"].tolist() == ["t1", "t3"]
    assert leaderboard.ranked[list(TEST_COLUMNS)].notna().all(axis=None)
    error = leaderboard.failed.set_index("trial_id")["error"]["t2"]
    assert "checkpoint.pt is missing" in error and "checkpoint_000001" in error
    assert set(leaderboard.checkpoints) == {"t1", "t3"}


def test_a_folder_that_is_not_an_experiment_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=r"sweep\.yaml is missing"):
        read_experiment(tmp_path)


def test_a_result_line_cut_short_by_a_killed_process_is_ignored(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    results = experiment / "t2_regularized_cnn" / "result.json"
    results.write_text(results.read_text() + '{"epoch": 3, "val_mac')
    record = next(t for t in read_experiment(experiment).trials if t.trial_id == "t2")
    assert record.results["epoch"].tolist() == [1, 2]
    assert not math.isnan(record.results["val_macro_auc"].iloc[-1])
