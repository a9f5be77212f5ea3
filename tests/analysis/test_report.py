from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages.journal import JournalFileBackend, JournalStorage
from sklearn.metrics import roc_auc_score, roc_curve

from cxrtune.analysis import report_tables
from cxrtune.analysis.experiment import DatasetInfo, Predictions, TrialRecord
from cxrtune.analysis.report import write_report
from cxrtune.trainables.metrics import classification_metrics
from tests.analysis.test_leaderboard import make_experiment

FAMILY = CategoricalDistribution(["baseline_cnn", "regularized_cnn", "vgg16"])
IMBALANCE = CategoricalDistribution(["none", "oversample", "class_weight"])
BATCH_SIZE = CategoricalDistribution([16, 32])
# The families search different lr ranges, as the built-in spaces do.
CNN_LR = FloatDistribution(1e-4, 3e-3, log=True)
VGG16_LR = FloatDistribution(1e-5, 1e-3, log=True)


def search_trial(
    family: str, imbalance: str, lr: float, values: tuple[float, float], **extra: Any
) -> optuna.trial.FrozenTrial:
    """A finished trial as OptunaSearch records it: the family first, then its parameters."""
    params: dict[str, Any] = {"family": family, "batch_size": 16, "imbalance": imbalance, "lr": lr}
    distributions: dict[str, BaseDistribution] = {
        "family": FAMILY,
        "batch_size": BATCH_SIZE,
        "imbalance": IMBALANCE,
        "lr": VGG16_LR if family == "vgg16" else CNN_LR,
    }
    for name, value in extra.items():
        params[name] = value
        distributions[name] = (
            IntDistribution(0, 5) if name == "finetune_blocks" else FloatDistribution(0.0, 0.6)
        )
    return optuna.trial.create_trial(params=params, distributions=distributions, values=values)


# COVID recall is decided by imbalance alone; macro AUC by lr within each family.
SEARCH_TRIALS = (
    ("baseline_cnn", "none", 1e-4, (0.0, 0.60)),
    ("baseline_cnn", "oversample", 1e-3, (0.8, 0.70)),
    ("regularized_cnn", "class_weight", 2e-4, (0.8, 0.65), {"dropout": 0.1}),
    ("regularized_cnn", "none", 2e-3, (0.0, 0.85), {"dropout": 0.4}),
    ("vgg16", "oversample", 1e-5, (0.8, 0.55), {"finetune_blocks": 1}),
    ("vgg16", "none", 5e-4, (0.0, 0.75), {"finetune_blocks": 3}),
)


def search_trials() -> list[optuna.trial.FrozenTrial]:
    return [
        search_trial(family, imbalance, lr, values, **(extra[0] if extra else {}))
        for family, imbalance, lr, values, *extra in SEARCH_TRIALS
    ]


def write_search_study(path: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The sweep's study as the sweep leaves it: an Optuna journal file named ``cxrtune``."""
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(path))),
        study_name="cxrtune",
        directions=["maximize", "maximize"],
    )
    study.add_trials(trials)


def make_report_experiment(root: Path) -> Path:
    """``make_experiment`` plus what a real sweep also leaves: losses and times per epoch,
    max_epochs and resources in the sweep file, the ingest report and the Optuna journal.
    """
    experiment = make_experiment(root)
    for results in sorted(experiment.glob("*/result.json")):
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        for row in rows:
            epoch = row["epoch"]
            row.update(
                train_loss=1.2 / epoch, val_loss=1.3 / epoch + 0.05, time_total_s=360.0 * epoch
            )
        results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sweep = experiment / "sweep.yaml"
    sweep.write_text(
        sweep.read_text()
        + "max_epochs: 3\n"
        + "families: [baseline_cnn, regularized_cnn, vgg16]\n"
        + "resources:\n"
        + "  baseline_cnn: {cpus: 2, gpus: 0}\n"
        + "  regularized_cnn: {cpus: 1, gpus: 0.5}\n"
        + "  vgg16: {cpus: 4, gpus: 1}\n"
    )
    (experiment / "ingest_report.txt").write_text("Ingest: 100 images, 0 unreadable <none>\n")
    write_search_study(experiment / "optuna_study.journal", search_trials())
    return experiment


def record(
    trial_id: str, family: str, epochs: int, *, error: str | None = None, **columns: Any
) -> TrialRecord:
    results = pd.DataFrame({"epoch": range(1, epochs + 1), **columns})
    return TrialRecord(
        trial_id=trial_id,
        directory=Path(trial_id),
        config={"family": family, "max_epochs": 4},
        results=results,
        error=error,
    )


def ranked_table(rows: list[tuple[str, str, str, float, float, float]]) -> pd.DataFrame:
    """A ranked leaderboard table: (trial, family, imbalance, val recall, val AUC, test AUC)."""
    table = pd.DataFrame(
        rows,
        columns=[
            "trial_id",
            "family",
            "imbalance",
            "val_covid_recall_at_spec",
            "val_macro_auc",
            "test_macro_auc",
        ],
    )
    table.insert(0, "rank", range(1, len(rows) + 1))
    table["test_covid_recall"] = 0.5
    table["test_covid_recall_at_threshold"] = table["val_covid_recall_at_spec"] - 0.1
    for column in ("test_covid_recall", "test_macro_auc", "test_covid_recall_at_threshold"):
        table[f"{column}_low"] = table[column] - 0.05
        table[f"{column}_high"] = table[column] + 0.05
    table["test_accuracy"] = 0.5
    table["test_specificity_at_threshold"] = 0.95
    return table


def test_intervals_show_beside_their_estimates_and_missing_values_as_a_dash() -> None:
    table = pd.DataFrame(
        {
            "trial_id": ["a", None],
            "lr": [0.0005, math.nan],
            "test_macro_auc": [0.9333, math.nan],
            "test_macro_auc_low": [0.88, math.nan],
            "test_macro_auc_high": [0.97, math.nan],
            "rank": pd.array([1, None], dtype="Int64"),
        }
    )
    shown = report_tables.display_table(table)
    assert list(shown.columns) == ["trial_id", "lr", "test_macro_auc", "rank"]
    assert shown.iloc[0].tolist() == ["a", "5.0e-04", "0.933 [0.880, 0.970]", "1"]
    assert shown.iloc[1].tolist() == ["-", "-", "-", "-"]


def test_split_counts_have_a_row_per_class_in_dataset_order_and_totals() -> None:
    dataset = DatasetInfo(
        root="data",
        synthetic=False,
        layout="imagefolder",
        cache_path="cache.npz",
        image_size=64,
        class_names=["COVID", "Normal"],
        positive_class="COVID",
        split_counts={"train": {"Normal": 10, "COVID": 3}, "test": {"COVID": 1}},
    )
    counts = report_tables.split_counts(dataset).set_index("class")
    assert counts.index.tolist() == ["COVID", "Normal", "total"]
    assert counts.loc["Normal"].tolist() == [10, 0, 10]
    assert counts.loc["total"].tolist() == [13, 1, 14]


def test_the_ingest_report_is_read_when_the_sweep_wrote_one(tmp_path: Path) -> None:
    assert report_tables.read_ingest_report(tmp_path) is None
    (tmp_path / "ingest_report.txt").write_text("100 images\n")
    assert report_tables.read_ingest_report(tmp_path) == "100 images\n"


def test_the_pareto_optimal_trials_are_those_no_other_trial_dominates() -> None:
    ranked = ranked_table(
        [
            ("a", "baseline_cnn", "none", 0.9, 0.7, 0.7),
            ("b", "vgg16", "none", 0.5, 0.9, 0.9),
            ("c", "vgg16", "oversample", 0.5, 0.8, 0.8),  # b is as good on recall, better on AUC
            ("d", "regularized_cnn", "none", 0.4, 0.6, 0.6),
        ]
    )
    points = report_tables.trial_points(ranked)
    assert points["pareto_optimal"].tolist() == [True, True, False, False]
    assert points["pareto_front"].tolist() == [1, 1, 2, 3]
    assert points["family"].tolist() == ["baseline_cnn", "vgg16", "vgg16", "regularized_cnn"]


def test_roc_curves_match_scikit_learn_for_each_class_that_has_test_images() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]
    )
    roc = report_tables.roc_table(
        Predictions(labels, probabilities), ["COVID", "Normal", "Pneumonia"], positive_index=0
    )
    assert roc["class"].unique().tolist() == ["COVID", "Normal"]  # no Pneumonia in test
    covid = roc[roc["class"] == "COVID"]
    false_positive_rate, true_positive_rate, _ = roc_curve(labels == 0, probabilities[:, 0])
    assert covid["false_positive_rate"].tolist() == false_positive_rate.tolist()
    assert covid["true_positive_rate"].tolist() == true_positive_rate.tolist()
    assert covid["auc"].iloc[0] == roc_auc_score(labels == 0, probabilities[:, 0])


@pytest.mark.parametrize("positive_index", [0, 1])
def test_two_classes_have_one_roc_curve_whose_auc_is_the_macro_auc(positive_index: int) -> None:
    """COVID versus Normal: the positive class's curve only; the other is its mirror image."""
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    covid = np.array([0.9, 0.4, 0.7, 0.5, 0.2, 0.1, 0.6])
    probabilities = np.stack([covid, 1 - covid], axis=1)
    classes = ["COVID", "Normal"]
    roc = report_tables.roc_table(Predictions(labels, probabilities), classes, positive_index)
    assert roc["class"].unique().tolist() == [classes[positive_index]]
    expected = classification_metrics(labels, probabilities, classes, positive_index)
    assert roc["auc"].iloc[0] == expected["macro_auc"]
    false_positive_rate, _, _ = roc_curve(
        labels == positive_index, probabilities[:, positive_index]
    )
    assert roc["false_positive_rate"].tolist() == false_positive_rate.tolist()


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_roc_and_confusion_tables_cover_two_three_and_four_classes(classes: int) -> None:
    rng = np.random.default_rng(classes)
    labels = np.repeat(np.arange(classes), 5)
    probabilities = rng.dirichlet(np.ones(classes), len(labels))
    names = ["COVID", "Normal", "Pneumonia", "Lung Opacity"][:classes]
    roc = report_tables.roc_table(Predictions(labels, probabilities), names, positive_index=0)
    assert roc["class"].unique().tolist() == (["COVID"] if classes == 2 else names)
    confusion = report_tables.confusion_table(Predictions(labels, probabilities), names)
    assert len(confusion) == classes * classes
    assert confusion["count"].sum() == len(labels)


def test_confusion_rows_are_divided_by_the_images_of_their_true_class() -> None:
    labels = np.array([0, 0, 0, 1])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])
    confusion = report_tables.confusion_table(
        Predictions(labels, probabilities), ["COVID", "Normal", "X"]
    )
    counts = confusion.pivot(index="true_class", columns="predicted_class", values="count")
    assert counts.loc["COVID"].tolist() == [2, 1, 0]
    assert counts.loc["X"].tolist() == [0, 0, 0]
    fractions = confusion.pivot(
        index="true_class", columns="predicted_class", values="row_fraction"
    )
    assert fractions.loc["COVID"].tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert fractions.loc["X"].tolist() == [0, 0, 0]  # a class with no image, not NaN


def test_learning_curves_mark_the_chosen_epoch_and_the_last_epoch_of_an_asha_stop() -> None:
    trial = record("t", "vgg16", 2, train_loss=[1.0, 0.8], val_covid_recall=[0.2, 0.4])
    curves = report_tables.learning_curves(trial, {"max_epochs": 5}, best_epoch=1)
    assert curves["epoch"].tolist() == [1, 2]
    assert curves["train_loss"].tolist() == [1.0, 0.8]
    assert curves["val_loss"].isna().all()  # never reported
    assert curves["best_epoch"].tolist() == [True, False]
    assert curves["stopped_early"].tolist() == [False, True]
    assert curves["max_epochs"].tolist() == [5, 5]


def test_a_trial_that_ran_every_epoch_or_errored_is_not_marked_as_stopped_by_asha() -> None:
    finished = report_tables.learning_curves(record("t", "vgg16", 4), {"max_epochs": 4})
    errored = report_tables.learning_curves(
        record("t", "vgg16", 2, error="boom"), {"max_epochs": 4}
    )
    assert not finished["stopped_early"].any()
    assert not errored["stopped_early"].any()


def test_family_summary_counts_trials_and_charges_hours_at_each_family_s_resources() -> None:
    trials = [
        record("a", "baseline_cnn", 4, time_total_s=[900.0, 1800.0, 2700.0, 3600.0]),
        record("b", "baseline_cnn", 2, time_total_s=[900.0, 1800.0]),  # stopped by ASHA
        record("c", "vgg16", 1, error="nan loss", time_total_s=[1800.0]),
    ]
    ranked = ranked_table(
        [
            ("a", "baseline_cnn", "none", 0.8, 0.7, 0.7),
            ("b", "baseline_cnn", "none", 0.4, 0.9, 0.9),
        ]
    )
    sweep = {
        "max_epochs": 4,
        "families": ["baseline_cnn", "regularized_cnn", "vgg16"],
        "resources": {"baseline_cnn": {"cpus": 2, "gpus": 0}, "vgg16": {"cpus": 4, "gpus": 0.5}},
    }
    summary = report_tables.family_summary(trials, ranked, sweep).set_index("family")
    assert summary.index.tolist() == ["baseline_cnn", "regularized_cnn", "vgg16"]
    baseline = summary.loc["baseline_cnn"]
    assert (baseline["trials"], baseline["failed"], baseline["stopped_early"]) == (2, 0, 1)
    assert baseline["best_val_covid_recall_at_spec"] == 0.8
    assert baseline["median_val_covid_recall_at_spec"] == pytest.approx(0.6)
    assert baseline["best_val_macro_auc"] == 0.9
    assert baseline["median_val_macro_auc"] == pytest.approx(0.8)
    assert (baseline["cpu_hours"], baseline["gpu_hours"]) == (3.0, 0.0)  # 1.5 h x 2 CPUs
    vgg16 = summary.loc["vgg16"]
    assert (vgg16["trials"], vgg16["failed"], vgg16["stopped_early"]) == (1, 1, 0)
    assert (vgg16["cpu_hours"], vgg16["gpu_hours"]) == (2.0, 0.25)
    assert math.isnan(vgg16["best_val_covid_recall_at_spec"])
    assert summary.loc["regularized_cnn", "trials"] == 0


def test_the_family_comparison_sets_each_family_s_best_ranked_trial_side_by_side() -> None:
    ranked = ranked_table(
        [
            ("b2", "baseline_cnn", "none", 0.9, 0.6, 0.6),
            ("r1", "regularized_cnn", "none", 0.8, 0.9, 0.8),
            ("b1", "baseline_cnn", "none", 0.5, 0.95, 0.9),
        ]
    )
    comparison = report_tables.family_comparison(ranked).set_index("family")
    assert comparison.index.tolist() == ["baseline_cnn", "regularized_cnn", "vgg16"]
    assert comparison["trial_id"].tolist()[:2] == ["b2", "r1"]
    assert comparison.loc["baseline_cnn", "test_macro_auc_high"] == pytest.approx(0.65)
    assert comparison.loc["vgg16"].isna().all()  # never ranked


def test_the_external_test_gap_is_test_minus_val_per_family_with_the_test_interval() -> None:
    """Issue item 3: internal val against the external test source, per family."""
    ranked = ranked_table(
        [
            ("b1", "baseline_cnn", "none", 0.9, 0.9, 0.7),
            ("r1", "regularized_cnn", "none", 0.8, 0.8, 0.78),
        ]
    )
    gap = report_tables.external_test_gap(report_tables.family_comparison(ranked)).set_index(
        "family"
    )
    assert gap.loc["baseline_cnn", "macro_auc_gap"] == pytest.approx(-0.2)
    assert gap.loc["baseline_cnn", "covid_recall_gap"] == pytest.approx(-0.1)
    assert gap.loc["baseline_cnn", "test_macro_auc_low"] == pytest.approx(0.65)
    # Recall is compared at the operating point: val recall at spec against test recall at
    # the val-chosen threshold. val 0.9 lies outside test's [0.65, 0.75]; r1's val 0.8 is
    # inside [0.73, 0.83] for AUC but its recall 0.8 is outside [0.65, 0.75].
    assert gap.loc["baseline_cnn", "val_inside_test_interval"] == "no"
    assert pd.isna(gap.loc["vgg16", "val_inside_test_interval"])
    ranked.loc[1, "test_covid_recall_at_threshold"] = 0.8
    ranked.loc[1, ["test_covid_recall_at_threshold_low", "test_covid_recall_at_threshold_high"]] = (
        0.7,
        0.85,
    )
    gap = report_tables.external_test_gap(report_tables.family_comparison(ranked)).set_index(
        "family"
    )
    assert gap.loc["regularized_cnn", "val_inside_test_interval"] == "yes"


def test_imbalance_strategies_show_the_best_and_median_of_their_trials() -> None:
    ranked = ranked_table(
        [
            ("o1", "vgg16", "oversample", 0.9, 0.7, 0.75),
            ("w1", "baseline_cnn", "class_weight", 0.8, 0.8, 0.7),
            ("o2", "baseline_cnn", "oversample", 0.5, 0.9, 0.85),
            ("o3", "regularized_cnn", "oversample", 0.4, 0.6, 0.6),
        ]
    )
    strategies = report_tables.imbalance_comparison(ranked).set_index("imbalance")
    assert strategies.index.tolist() == ["none", "oversample", "class_weight"]
    oversample = strategies.loc["oversample"]
    assert (oversample["trials"], oversample["best_trial"]) == (3, "o1")
    assert oversample["best_val_covid_recall_at_spec"] == 0.9
    assert oversample["median_val_covid_recall_at_spec"] == 0.5
    assert oversample["best_test_macro_auc"] == 0.85
    assert oversample["median_test_macro_auc"] == 0.75
    assert strategies.loc["none", "trials"] == 0
    assert math.isnan(strategies.loc["none", "median_val_macro_auc"])


def in_memory_study(trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.add_trials(trials)
    return study


def test_importance_puts_first_the_parameter_that_decides_an_objective() -> None:
    importance = report_tables.parameter_importance(in_memory_study(search_trials()))
    recall = importance[
        (importance["scope"] == "all families")
        & (importance["objective"] == "val_covid_recall_at_spec")
    ]
    assert recall["parameter"].iloc[0] == "imbalance"
    assert recall["importance"].sum() == pytest.approx(1.0)
    # lr has a different range for vgg16, so only the per-family scopes can weigh it.
    assert "lr" not in set(importance.loc[importance["scope"] == "all families", "parameter"])
    baseline = importance[importance["scope"] == "baseline_cnn"]
    assert set(baseline["parameter"]) == {"batch_size", "imbalance", "lr"}
    assert set(importance["scope"]) == {"all families", "baseline_cnn", "regularized_cnn", "vgg16"}


def test_importance_leaves_out_an_objective_that_took_a_single_value() -> None:
    trials = [
        search_trial("baseline_cnn", "none", 1e-4, (0.5, 0.6)),
        search_trial("baseline_cnn", "oversample", 1e-3, (0.5, 0.8)),
    ]
    importance = report_tables.parameter_importance(in_memory_study(trials))
    assert set(importance["objective"]) == {"val_macro_auc"}
    assert set(importance["scope"]) == {"all families"}  # one family: no scope of its own


def test_slices_list_each_parameter_a_trial_sampled_with_its_objective_values() -> None:
    slices = report_tables.parameter_slices(in_memory_study(search_trials()[4:]))
    first = slices[slices["trial_number"] == 0].set_index("parameter")
    assert first.index.tolist() == ["lr", "batch_size", "imbalance", "finetune_blocks"]
    assert first.loc["imbalance", "value"] == "oversample"
    assert first.loc["imbalance", "position"] == 1  # oversample among none, oversample, ...
    assert math.isnan(first.loc["lr", "position"]) and first.loc["lr", "log_scale"]
    assert (first["val_covid_recall_at_spec"] == 0.8).all() and (first["family"] == "vgg16").all()


def test_the_study_is_read_from_the_experiment_journal_without_creating_one(
    tmp_path: Path,
) -> None:
    study, reason = report_tables.read_search_study(tmp_path)
    assert study is None and "optuna_study.journal" in reason
    assert not (tmp_path / "optuna_study.journal").exists()
    write_search_study(tmp_path / "optuna_study.journal", search_trials()[:1])
    study, reason = report_tables.read_search_study(tmp_path)
    assert study is None and "1 complete trial" in reason
    other = tmp_path / "other"
    other.mkdir()
    write_search_study(other / "optuna_study.journal", search_trials())
    study, reason = report_tables.read_search_study(other)
    assert study is not None and reason == ""
    assert len(study.trials) == len(SEARCH_TRIALS)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A report written with the defaults, and its HTML."""
    path = write_report(make_report_experiment(tmp_path_factory.mktemp("report")))
    return path, path.read_text()


class Attributes(HTMLParser):
    """Every tag's attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Attributes()
    parser.feed(text)
    return parser.tags


def test_the_report_goes_to_the_report_folder_and_embeds_every_figure_it_writes(
    written: tuple[Path, str],
) -> None:
    path, text = written
    assert path.name == "report.html" and path.parent.name == "report"
    images = [attrs["src"] for tag, attrs in parse(text) if tag == "img"]
    figures = sorted(path.parent.glob("*.png"))
    embedded = {
        f"data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}" for f in figures
    }
    assert set(images) == embedded and len(images) == len(figures)
    names = {figure.name for figure in figures}
    # Three ranked trials, fewer than top=5; t4 errored.
    assert {f"trial_0{rank}_t{rank}_roc.png" for rank in (1, 2, 3)} <= names
    assert {"pareto_front.png", "importance.png", "slices.png", "imbalance.png"} <= names
    assert not any("t4" in name for name in names)


def test_the_report_loads_nothing_from_anywhere_else(written: tuple[Path, str]) -> None:
    text = written[1]
    for tag, attrs in parse(text):
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, value)
    assert "<script" not in text and "@import" not in text and "url(" not in text


def test_the_report_shows_the_header_the_ingest_report_and_intervals(
    written: tuple[Path, str],
) -> None:
    text = written[1]
    assert "SYNTHETIC demo data" in text
    assert "Ingest: 100 images, 0 unreadable &lt;none&gt;" in text  # escaped
    assert "NonFiniteLossError: training loss became nan" in text
    assert text.count("</td>") > 0 and ">nan<" not in text.lower()
    leaderboard = text[text.index('<section id="leaderboard">') : text.index('<section id="data">')]
    assert leaderboard.count(" [") >= 2 * 3  # two intervals in each of three rows


def test_the_importance_section_shows_the_figures_when_the_study_has_trials(
    written: tuple[Path, str],
) -> None:
    text = written[1]
    section = text[text.index('<section id="importance">') :]
    assert 'id="figure-importance"' in section and 'id="figure-slices"' in section
    assert "6 complete trials" in section


def test_without_a_journal_the_report_says_why_and_shows_only_the_top_trials(
    tmp_path: Path,
) -> None:
    experiment = make_experiment(tmp_path)
    path = write_report(experiment, top=1, out_dir=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "report.html"
    text = path.read_text()
    section = text[text.index('<section id="importance">') :]
    assert "optuna_study.journal is not in the experiment dir" in section
    assert "<img" not in section
    assert "No ingest_report.txt" in text
    assert sorted(p.name for p in path.parent.glob("trial_*.png")) == [
        "trial_01_t1_confusion.png",
        "trial_01_t1_learning_curves.png",
        "trial_01_t1_roc.png",
    ]


def test_an_external_test_source_gets_its_val_versus_test_section(tmp_path: Path) -> None:
    """Issue item 3: the report's internal-val versus external-test gap, per family."""
    import dataclasses

    from cxrtune.analysis.experiment import DatasetInfo

    experiment = make_experiment(tmp_path)
    info = DatasetInfo.read(experiment / "dataset.json")
    dataclasses.replace(info, test_source="Hospital B").write(experiment / "dataset.json")
    text = write_report(experiment, top=1).read_text()
    section = text[text.index('<section id="external-test">') :]
    section = section[: section.index("</section>")]
    assert "<b>Hospital B</b> (4 images)" in section
    assert "macro_auc_gap" in section and "val_inside_test_interval" in section


def test_a_shortcut_warning_of_the_ingest_report_opens_the_data_section(tmp_path: Path) -> None:
    """Issue item 4: the report says so in plain words, naming the sources."""
    from cxrtune.trainables.data import IngestReport
    from cxrtune.trainables.shortcut import ShortcutCheck

    experiment = make_experiment(tmp_path)
    check = ShortcutCheck(
        sources={"site A": 50, "site B": 50},
        balanced_accuracy=0.97,
        chance=0.5,
        cramers_v=0.8,
        warns=True,
    )
    ingest = IngestReport(data="m.csv", layout="manifest", shortcut=check.to_dict())
    (experiment / "ingest_report.json").write_text(ingest.to_json())
    text = write_report(experiment, top=1).read_text()
    section = text[text.index('<section id="data">') :]
    assert section.index("SHORTCUT RISK: the source (site A, site B)") < section.index("<table")
    assert report_tables.read_shortcut_warning(tmp_path) == ""  # no ingest report there


def test_a_top_below_one_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top must be at least 1"):
        write_report(tmp_path, top=0)


def test_a_report_of_an_experiment_where_no_trial_reported_still_says_so(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path)
    for results in experiment.glob("*/result.json"):
        results.unlink()
    text = write_report(experiment).read_text()
    assert "No trial reported a result." in text
    assert "4 trial(s) failed" in text


def test_the_ensemble_row_is_the_average_of_the_top_trials_probabilities(tmp_path: Path) -> None:
    from cxrtune.analysis.experiment import read_experiment
    from cxrtune.analysis.leaderboard import build_leaderboard
    from cxrtune.trainables.metrics import classification_metrics

    experiment = read_experiment(make_report_experiment(tmp_path))
    leaderboard = build_leaderboard(experiment)
    table = report_tables.ensemble_comparison(experiment, leaderboard, 2)
    top = list(leaderboard.ranked["trial_id"][:2])
    assert table["model"].tolist() == [f"rank 1 ({top[0]})", "top-2 ensemble"]
    averaged = np.mean([leaderboard.predictions[t]["test"].probabilities for t in top], axis=0)
    labels = leaderboard.predictions[top[0]]["test"].labels
    expected = classification_metrics(
        labels, averaged, experiment.dataset.class_names, experiment.dataset.positive_index
    )
    assert table.loc[1, "test_macro_auc"] == pytest.approx(expected["macro_auc"])
    assert table.loc[0, "test_macro_auc"] == leaderboard.ranked.loc[0, "test_macro_auc"]
    assert report_tables.ensemble_comparison(experiment, leaderboard, 1).empty


def test_the_decision_summary_leads_with_rank_1_then_the_best_of_each_family() -> None:
    ranked = pd.DataFrame(
        {
            "rank": [1, 2, 3],
            "trial_id": ["a", "b", "c"],
            "family": ["vgg16", "vgg16", "baseline_cnn"],
            "imbalance": ["oversample", "none", "none"],
            "val_covid_recall_at_spec": [0.9, 0.8, 0.7],
            "val_macro_auc": [0.95, 0.9, 0.85],
            "test_covid_recall_at_threshold": [0.944, 0.9, 0.8],
            "test_macro_auc": [0.95, 0.9, 0.85],
            "test_macro_auc_low": [0.93, 0.88, 0.8],
            "test_macro_auc_high": [0.97, 0.92, 0.9],
        }
    )
    summary = report_tables.decision_summary(ranked)
    assert summary[""].tolist() == ["recommended", "best vgg16", "best baseline_cnn"]
    assert summary["trial"].tolist() == ["a", "a", "c"]
    assert summary["test AUC (95% CI)"].iloc[0] == "0.95 (0.93\N{EN DASH}0.97)"


def test_importance_of_a_large_study_is_read_from_a_seeded_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from optuna.importance import FanovaImportanceEvaluator

    monkeypatch.setattr(report_tables, "IMPORTANCE_TRIALS", 5)
    seen: list[list[int]] = []
    evaluate = FanovaImportanceEvaluator.evaluate

    def recording(self: Any, study: optuna.Study, **kwargs: Any) -> Any:
        seen.append([trial.number for trial in study.trials])
        return evaluate(self, study, **kwargs)

    monkeypatch.setattr(FanovaImportanceEvaluator, "evaluate", recording)
    trials = [
        search_trial("baseline_cnn", imbalance, lr, (0.1 * (index % 7), 0.5 + 0.01 * index))
        for index, (imbalance, lr) in enumerate(
            [
                (kind, rate)
                for kind in ("none", "oversample", "class_weight")
                for rate in (1e-4, 1e-3, 3e-3)
            ]
        )
    ]
    first = report_tables.parameter_importance(in_memory_study(trials))
    assert seen and all(len(numbers) == 5 for numbers in seen)
    assert first.equals(report_tables.parameter_importance(in_memory_study(trials)))
