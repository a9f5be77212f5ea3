from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrtune.analysis.experiment import DatasetInfo, ExperimentError, read_experiment
from cxrtune.analysis.leaderboard import (
    COLUMNS,
    best_epoch_row,
    build_leaderboard,
    format_leaderboard,
    write_leaderboard,
)
from cxrtune.trainables.checkpoints import save_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.data import Dataset, write_cache
from cxrtune.trainables.models import create_model
from cxrtune.trainables.splits import stratified_split, write_splits

CLASSES = ("COVID", "Normal", "Pneumonia")
SIZE = 16


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
    (experiment / "sweep.yaml").write_text("scheduler_metric: val_macro_auc\nweights: none\n")
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


def test_trials_rank_on_the_validation_metrics_of_their_best_epoch(tmp_path: Path) -> None:
    leaderboard = build_leaderboard(read_experiment(make_experiment(tmp_path)))
    ranked = leaderboard.ranked
    assert list(ranked.columns) == list(COLUMNS)
    # Best epochs by val_macro_auc: t1 epoch 2 (0.75, 0.80), t2 epoch 2 (0.50, 0.90),
    # t3 epoch 1 (0.25, 0.65).
    assert ranked["trial_id"].tolist() == ["t1", "t2", "t3"]
    assert ranked["best_epoch"].tolist() == [2, 2, 1]
    assert ranked["epochs"].tolist() == [3, 2, 1]
    assert ranked.loc[0, "val_covid_recall"] == 0.75
    assert not ranked["pretrained"].any()


def test_test_metrics_come_from_the_chosen_checkpoint_on_the_test_split(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    leaderboard = build_leaderboard(read_experiment(experiment))
    saved = json.loads((experiment / "t1_baseline_cnn" / "test_evaluation.json").read_text())
    assert saved["checkpoint"] == "checkpoint_000001"
    labels, probabilities = np.array(saved["labels"]), np.array(saved["probabilities"])
    splits = pd.read_csv(experiment / "splits.csv")
    assert len(labels) == (splits["split"] == "test").sum()
    expected_auc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    row = leaderboard.ranked.set_index("trial_id").loc["t1"]
    assert row["test_macro_auc"] == pytest.approx(expected_auc, abs=1e-5)
    assert 0.0 <= row["test_accuracy"] <= 1.0


def test_cached_test_evaluations_are_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = make_experiment(tmp_path)
    first = build_leaderboard(read_experiment(experiment))
    import cxrtune.analysis.test_evaluation as test_evaluation

    monkeypatch.setattr(
        test_evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("re-evaluated")
    )
    second = build_leaderboard(read_experiment(experiment))
    pd.testing.assert_frame_equal(first.ranked, second.ranked)


def test_errored_trials_are_listed_apart_with_their_error(tmp_path: Path) -> None:
    leaderboard = build_leaderboard(read_experiment(make_experiment(tmp_path)))
    assert leaderboard.failed["trial_id"].tolist() == ["t4"]
    assert "NonFiniteLossError" in leaderboard.failed.loc[0, "error"]
    text = format_leaderboard(leaderboard)
    assert "1 trial(s) failed" in text and "NonFiniteLossError: training loss became nan" in text


def test_the_leaderboard_files_are_written(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    leaderboard = build_leaderboard(read_experiment(experiment))
    write_leaderboard(leaderboard, experiment)
    table = pd.read_csv(experiment / "leaderboard.csv")
    assert table["trial_id"].tolist() == ["t1", "t2", "t3"]
    markdown = (experiment / "leaderboard.md").read_text()
    assert markdown.count("\n| 1 ") == 1 and "SYNTHETIC" in markdown
    assert "| t4 " in markdown and "NonFiniteLossError: training loss became nan" in markdown


def test_the_header_says_the_data_are_synthetic(tmp_path: Path) -> None:
    leaderboard = build_leaderboard(read_experiment(make_experiment(tmp_path)), evaluate_test=False)
    assert "SYNTHETIC" in leaderboard.header


def test_best_epoch_skips_epochs_whose_checkpoint_was_not_kept() -> None:
    results = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "val_macro_auc": [0.7, 0.9, 0.8],
            "checkpoint_dir_name": ["checkpoint_000000", None, "checkpoint_000002"],
        }
    )
    best = best_epoch_row(results, "val_macro_auc", "max")
    assert best is not None and best["epoch"] == 3


def test_best_epoch_of_a_trial_without_results_is_none() -> None:
    assert best_epoch_row(pd.DataFrame(), "val_macro_auc", "max") is None


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
