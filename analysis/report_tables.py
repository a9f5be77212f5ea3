"""The report's tables: plain pandas frames computed from an experiment, one per figure or table.

Compute first, draw second: ``cxrtune.analysis.plots`` only renders these frames and
``cxrtune.analysis.report`` only lays them out, so the tests check numbers here.
Everything is measured on what the leaderboard already chose: each trial's best-validation
checkpoint and its saved ``val``/``test`` predictions. Optuna is imported only by the functions
that read the sweep's study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from cxrtune.analysis.experiment import (
    INGEST_REPORT_JSON,
    INGEST_REPORT_TEXT,
    OPTUNA_JOURNAL,
    OPTUNA_STUDY_NAME,
    DatasetInfo,
    Experiment,
    Predictions,
    TrialRecord,
)
from cxrtune.analysis.intervals import INTERVAL_METRICS
from cxrtune.analysis.leaderboard import (
    HYPERPARAMETERS,
    Leaderboard,
    ensemble_metrics,
    format_interval,
    format_number,
)
from cxrtune.analysis.ranking import DEFAULT_OBJECTIVES, pareto_front_rank
from cxrtune.analysis.terminal import compact_table
from cxrtune.spaces import FAMILIES, IMBALANCE_STRATEGIES
from cxrtune.trainables.config import DEFAULT_MAX_EPOCHS

if TYPE_CHECKING:
    import optuna

__all__ = [
    "LEARNING_CURVE_METRICS",
    "confusion_table",
    "display_table",
    "external_test_gap",
    "family_comparison",
    "family_summary",
    "imbalance_comparison",
    "learning_curves",
    "objective_names",
    "parameter_importance",
    "parameter_slices",
    "read_ingest_report",
    "read_search_study",
    "read_shortcut_warning",
    "roc_table",
    "split_counts",
    "trial_points",
]

# The per-epoch series a learning curve shows; a series a trial never reported stays NaN.
LEARNING_CURVE_METRICS = ("train_loss", "val_loss", "val_covid_recall", "val_macro_auc")
# What a trial reserves when the sweep file names no resources (the sweep file's own default).
DEFAULT_CPUS, DEFAULT_GPUS = 1.0, 0.0
# The test metrics that carry a 95% bootstrap interval (``<name>_low``, ``<name>_high``).
INTERVAL_COLUMNS = tuple(f"test_{name}" for name in INTERVAL_METRICS)
ALL_FAMILIES = "all families"
MIN_TRIALS_FOR_IMPORTANCE = 2
# fANOVA's forest grows with its trials: a scope of more is read from a seeded sample of this
# many (at 10,000 trials the whole study took minutes; a sample this size weighs the few
# parameters of a family as well).
IMPORTANCE_TRIALS = 1_000
# Trees of fANOVA's forest (Optuna's default is 64). On 1,000 replayed trials, 16 trees ran
# 4.3x faster and moved no importance by more than 0.011, next to 0.006 between two seeds of
# 64 trees; halving the trials instead moved them by 0.135 and reordered them.
IMPORTANCE_TREES = 16


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for a reader: each ``X``/``X_low``/``X_high`` triple as ``0.933 [0.880, 0.970]``.

    Floats show three decimals (tiny ones in scientific notation) and missing values ``-``,
    as the leaderboard's own table does.
    """
    shown = table.copy()
    for column in table.columns:
        low, high = f"{column}_low", f"{column}_high"
        if low in table and high in table:
            shown[column] = [
                format_interval(float(point), float(lo), float(hi))
                for point, lo, hi in zip(table[column], table[low], table[high], strict=True)
            ]
            shown = shown.drop(columns=[low, high])
    for column in shown.columns:
        if column == "test_evaluated":
            shown[column] = shown[column].map(lambda tested: "yes" if tested else "not evaluated")
        elif shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(format_number)
        else:
            shown[column] = shown[column].map(_format_cell)
    return shown


def _format_cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):
        return format_number(float(value))
    return str(value)


def split_counts(dataset: DatasetInfo) -> pd.DataFrame:
    """Images per class (rows) and split (columns), with totals; classes in the dataset's order."""
    counts = pd.DataFrame(dataset.split_counts).fillna(0).astype(int)
    classes = [name for name in dataset.class_names if name in counts.index]
    counts = counts.reindex(classes + [name for name in counts.index if name not in classes])
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    counts.index.name = "class"
    return counts.reset_index()


def read_ingest_report(experiment_dir: Path) -> str | None:
    """The ingest report a sweep wrote into its experiment dir; None for older experiments."""
    path = Path(experiment_dir) / INGEST_REPORT_TEXT
    return path.read_text() if path.is_file() else None


def read_shortcut_warning(experiment_dir: Path) -> str:
    """The ingest report's shortcut warning in plain words; "" when none was raised."""
    from cxrtune.trainables.data import IngestReport

    path = Path(experiment_dir) / INGEST_REPORT_JSON
    if not path.is_file():
        return ""
    check = IngestReport.from_json(path.read_text()).shortcut_check()
    return check.warning() if check is not None else ""


def trial_points(ranked: pd.DataFrame) -> pd.DataFrame:
    """One row per ranked trial: family, imbalance, val objectives and Pareto front (1 = best)."""
    points = ranked[["rank", "trial_id", "family", "imbalance", *DEFAULT_OBJECTIVES]].copy()
    points["pareto_front"] = pareto_front_rank(
        points[list(DEFAULT_OBJECTIVES)].to_numpy(dtype=float)
    )
    points["pareto_optimal"] = points["pareto_front"] == 1
    return points.reset_index(drop=True)


def roc_table(
    predictions: Predictions, class_names: Sequence[str], positive_index: int
) -> pd.DataFrame:
    """One-vs-rest ROC curve of every class present in ``predictions`` (and absent from none).

    Columns: ``class``, ``false_positive_rate``, ``true_positive_rate``, ``auc`` (the class's
    one-vs-rest AUC, repeated on each of its rows). A class with no image, or with every image,
    has no curve. With two classes only the positive class has a curve: the other's is its
    mirror image, with the same AUC.
    """
    frames = []
    for index, name in enumerate(class_names):
        if len(class_names) == 2 and index != positive_index:
            continue
        positive = predictions.labels == index
        if positive.all() or not positive.any():
            continue
        scores = predictions.probabilities[:, index]
        false_positive_rate, true_positive_rate, _ = roc_curve(positive, scores)
        frames.append(
            pd.DataFrame(
                {
                    "class": name,
                    "false_positive_rate": false_positive_rate,
                    "true_positive_rate": true_positive_rate,
                    "auc": roc_auc_score(positive, scores),
                }
            )
        )
    columns = ["class", "false_positive_rate", "true_positive_rate", "auc"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def confusion_table(predictions: Predictions, class_names: Sequence[str]) -> pd.DataFrame:
    """Argmax confusion matrix, long: true_class, predicted_class, count, row_fraction.

    ``row_fraction`` divides by the images of the true class (0 for a class with no image), so
    the diagonal is each class's recall.
    """
    predicted = predictions.probabilities.argmax(axis=1)
    counts = confusion_matrix(predictions.labels, predicted, labels=range(len(class_names)))
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    true_index, predicted_index = np.indices(counts.shape)
    return pd.DataFrame(
        {
            "true_class": np.asarray(class_names)[true_index.ravel()],
            "predicted_class": np.asarray(class_names)[predicted_index.ravel()],
            "count": counts.ravel(),
            "row_fraction": fractions.ravel(),
        }
    )


def _max_epochs(record: TrialRecord, sweep: Mapping[str, Any]) -> int:
    return int(sweep.get("max_epochs", record.config.get("max_epochs", DEFAULT_MAX_EPOCHS)))


def _stopped_early(record: TrialRecord, sweep: Mapping[str, Any]) -> bool:
    """A trial that ended without error before max_epochs: ASHA stopped it.

    (A sweep interrupted mid-trial looks the same on disk.)
    """
    if record.error is not None or record.results.empty or "epoch" not in record.results:
        return False
    return int(record.results["epoch"].max()) < _max_epochs(record, sweep)


def learning_curves(
    record: TrialRecord, sweep: Mapping[str, Any], best_epoch: int | None = None
) -> pd.DataFrame:
    """One row per reported epoch: the ``LEARNING_CURVE_METRICS`` and two markers.

    ``best_epoch`` is True on the epoch whose checkpoint the leaderboard chose;
    ``stopped_early`` is True on the last epoch of a trial ASHA stopped before ``max_epochs``
    (the epochs it would have run, repeated on every row).
    """
    results = record.results
    if "epoch" not in results:
        results = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    curves = pd.DataFrame({"trial_id": record.trial_id, "epoch": results["epoch"].astype(int)})
    for metric in LEARNING_CURVE_METRICS:
        curves[metric] = results[metric].astype(float) if metric in results else math.nan
    curves["best_epoch"] = curves["epoch"] == best_epoch
    last = curves["epoch"] == curves["epoch"].max()
    curves["stopped_early"] = last & _stopped_early(record, sweep)
    curves["max_epochs"] = _max_epochs(record, sweep)
    return curves.reset_index(drop=True)


def _trial_hours(record: TrialRecord) -> float:
    """Wall-clock hours a trial ran: Ray's cumulative ``time_total_s`` (else the epoch times)."""
    results = record.results
    if "time_total_s" in results and results["time_total_s"].notna().any():
        return float(results["time_total_s"].max()) / 3600
    if "epoch_time_s" in results and results["epoch_time_s"].notna().any():
        return float(results["epoch_time_s"].sum()) / 3600
    return math.nan


def _family_order(names: Sequence[str]) -> list[str]:
    known = [family for family in FAMILIES if family in names]
    return known + sorted(set(names) - set(known))


def family_summary(
    trials: Sequence[TrialRecord], ranked: pd.DataFrame, sweep: Mapping[str, Any]
) -> pd.DataFrame:
    """Per family: trials run, failed and stopped early, best and median val objectives, hours.

    Families the sweep searched that never ran a trial appear with zeros. CPU and GPU hours are
    each trial's wall-clock time times the CPUs and GPUs its family reserved
    (``sweep["resources"][family]``); trials that never reported count as unknown, so a family
    none of whose trials reported time shows no hours.
    """
    names = [*sweep.get("families", []), *(record.family for record in trials)]
    resources = sweep.get("resources") or {}
    rows = []
    for family in _family_order(list(dict.fromkeys(names))):
        records = [record for record in trials if record.family == family]
        scores = ranked[ranked["family"] == family]
        reserved = resources.get(family) or {}
        hours = pd.Series([_trial_hours(record) for record in records], dtype=float)
        wall_hours = hours.sum(min_count=1)
        row: dict[str, Any] = {
            "family": family,
            "trials": len(records),
            "failed": sum(record.error is not None for record in records),
            "stopped_early": sum(_stopped_early(record, sweep) for record in records),
        }
        for metric in DEFAULT_OBJECTIVES:
            row[f"best_{metric}"] = scores[metric].max()
            row[f"median_{metric}"] = scores[metric].median()
        row["cpu_hours"] = wall_hours * float(reserved.get("cpus", DEFAULT_CPUS))
        row["gpu_hours"] = wall_hours * float(reserved.get("gpus", DEFAULT_GPUS))
        rows.append(row)
    return pd.DataFrame(rows)


def _interval_columns() -> list[str]:
    return [
        name for column in INTERVAL_COLUMNS for name in (column, f"{column}_low", f"{column}_high")
    ]


def family_comparison(ranked: pd.DataFrame, families: Sequence[str] = FAMILIES) -> pd.DataFrame:
    """The best-ranked trial of each family side by side, its val and test numbers.

    A family with no ranked trial keeps its row, with no trial and no numbers.
    """
    columns = [
        "family",
        "trial_id",
        "rank",
        *DEFAULT_OBJECTIVES,
        *_interval_columns(),
        "test_accuracy",
        "test_specificity_at_threshold",
    ]
    best = ranked.sort_values("rank").drop_duplicates("family").set_index("family")
    order = _family_order([*families, *best.index])
    table = best.reindex(order).rename_axis("family").reset_index()
    return table[columns].astype({"rank": "Int64"})


def external_test_gap(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per family, its best trial on internal val beside the external test source.

    ``comparison`` is ``family_comparison``'s table. A gap is test minus val, so a model
    that does worse at the unseen site has a negative gap; the test numbers keep their
    95% bootstrap interval, and ``val_inside_test_interval`` says whether the val number
    falls inside it (if not, the drop is more than resampling noise).
    """
    rows = []
    # (val column, test column, gap name): COVID recall at the operating point chosen on
    # val, and macro AUC.
    pairs = [
        ("val_covid_recall_at_spec", "test_covid_recall_at_threshold", "covid_recall_gap"),
        ("val_macro_auc", "test_macro_auc", "macro_auc_gap"),
    ]
    for _, best in comparison.iterrows():
        row: dict[str, Any] = {"family": best["family"], "trial_id": best["trial_id"]}
        inside = []
        for val_column, test_column, gap in pairs:
            val, test = best[val_column], best[test_column]
            low, high = best[f"{test_column}_low"], best[f"{test_column}_high"]
            row[val_column] = val
            row[test_column] = test
            row[f"{test_column}_low"] = low
            row[f"{test_column}_high"] = high
            row[gap] = test - val
            if not (pd.isna(val) or pd.isna(low)):
                inside.append(bool(low <= val <= high))
        row["val_inside_test_interval"] = (
            "yes" if inside and all(inside) else "no" if inside else None
        )
        rows.append(row)
    return pd.DataFrame(rows)


def ensemble_comparison(
    experiment: Experiment, leaderboard: Leaderboard, size: int
) -> pd.DataFrame:
    """The best trial beside the average of the top ``size`` trials' probabilities.

    The ensemble is what ``cxrtune export --ensemble`` writes: its threshold is chosen on
    the averaged val predictions. Fewer than two trials with predictions give no rows.
    """
    columns = [
        "model",
        *DEFAULT_OBJECTIVES,
        *_interval_columns(),
        "test_accuracy",
        "threshold",
        "test_specificity_at_threshold",
    ]
    ranked = leaderboard.ranked
    members = [trial for trial in ranked["trial_id"] if trial in leaderboard.predictions][:size]
    if len(members) < 2:
        return pd.DataFrame(columns=columns)
    best = ranked[ranked["trial_id"] == members[0]].iloc[0]
    single = {"model": f"rank {best['rank']} ({best['trial_id']})", **best.to_dict()}
    threshold, metrics = ensemble_metrics(experiment, leaderboard, members)
    averaged = {"model": f"top-{len(members)} ensemble", "threshold": threshold, **metrics}
    return pd.DataFrame([single, averaged])[columns]


def imbalance_comparison(ranked: pd.DataFrame) -> pd.DataFrame:
    """Per imbalance strategy (none, oversample, class_weight): trials, best and median metrics.

    The best trial is the best-ranked one; best and median are over every ranked trial of the
    strategy, on val and on test.
    """
    names = [
        *IMBALANCE_STRATEGIES,
        *sorted(set(ranked["imbalance"].dropna()) - set(IMBALANCE_STRATEGIES)),
    ]
    rows = []
    for strategy in names:
        group = ranked[ranked["imbalance"] == strategy].sort_values("rank")
        row: dict[str, Any] = {
            "imbalance": strategy,
            "trials": len(group),
            "best_trial": group["trial_id"].iloc[0] if len(group) else None,
        }
        for metric in (*DEFAULT_OBJECTIVES, "test_covid_recall", "test_macro_auc"):
            row[f"best_{metric}"] = group[metric].max()
            row[f"median_{metric}"] = group[metric].median()
        rows.append(row)
    return pd.DataFrame(rows)


def read_search_study(experiment_dir: Path) -> tuple[optuna.Study | None, str]:
    """The sweep's Optuna study from its journal, or None and why it cannot be used.

    Needs at least two complete trials. The journal is only read: a missing one is not created.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(experiment_dir) / OPTUNA_JOURNAL
    if not path.is_file():
        return None, f"No Optuna study: {OPTUNA_JOURNAL} is not in the experiment dir."
    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
        study = optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=storage)
    except KeyError:
        return (
            None,
            f"No Optuna study: {OPTUNA_JOURNAL} holds no study named {OPTUNA_STUDY_NAME!r}.",
        )
    except ValueError as error:  # Optuna's word for a journal line it cannot parse
        return None, f"No Optuna study: {OPTUNA_JOURNAL} could not be read ({error})."
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (
            f"The Optuna study has {len(complete)} complete trial(s); "
            f"parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE}."
        )
    return study, ""


def objective_names(study: optuna.Study, objectives: Sequence[str]) -> list[str]:
    """The sweep's names of the study's objectives; numbered when they do not match."""
    count = len(study.directions)
    if len(objectives) == count:
        return list(objectives)
    return [f"objective {index + 1}" for index in range(count)]


def _value_of(index: int) -> Callable[[optuna.trial.FrozenTrial], float]:
    return lambda trial: float(trial.values[index])


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every in-memory study it creates; the per-family studies are ours, not news."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def parameter_importance(
    study: optuna.Study, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> pd.DataFrame:
    """fANOVA importance (Optuna's evaluator, seeded) of each parameter for each objective.

    Columns: ``scope``, ``objective``, ``parameter``, ``importance`` (sums to 1 per scope and
    objective). Scope ``all families`` covers the parameters every complete trial shares with
    the same range (Optuna's intersection search space: ``lr`` drops out when the families search
    different ranges). Each family with at least two complete trials is a scope of its own,
    where every parameter of that family counts. A scope whose objective took one value only
    has no rows for it, as importance is undefined there. A scope of more than
    ``IMPORTANCE_TRIALS`` complete trials is read from a seeded random sample of that many.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    scopes: dict[str, list[optuna.trial.FrozenTrial]] = {ALL_FAMILIES: complete}
    sampled = [str(trial.params["family"]) for trial in complete if "family" in trial.params]
    # With one family searched, its own scope would repeat the first.
    families = _family_order(list(dict.fromkeys(sampled))) if len(set(sampled)) > 1 else []
    for family in families:
        members = [trial for trial in complete if trial.params.get("family") == family]
        if len(members) >= MIN_TRIALS_FOR_IMPORTANCE:
            scopes[family] = members
    rows = []
    for scope, members in scopes.items():
        if len(members) < MIN_TRIALS_FOR_IMPORTANCE:
            continue
        if len(members) > IMPORTANCE_TRIALS:
            chosen = np.random.default_rng(0).choice(len(members), IMPORTANCE_TRIALS, replace=False)
            members = [members[index] for index in sorted(chosen)]
        with _quiet_optuna():
            subset = optuna.create_study(directions=study.directions)
        subset.add_trials(members)
        shared = optuna.search_space.intersection_search_space(members)
        params = [name for name in shared if not (scope != ALL_FAMILIES and name == "family")]
        for index, objective in enumerate(objective_names(study, objectives)):
            values = np.array([trial.values[index] for trial in members], dtype=float)
            if not params or np.nanmax(values) == np.nanmin(values):
                continue
            importances = get_param_importances(
                subset,
                evaluator=FanovaImportanceEvaluator(n_trees=IMPORTANCE_TREES, seed=0),
                params=sorted(params),
                target=_value_of(index),
            )
            rows += [
                {"scope": scope, "objective": objective, "parameter": name, "importance": value}
                for name, value in importances.items()
            ]
    table = pd.DataFrame(rows, columns=["scope", "objective", "parameter", "importance"])
    return table.astype({"importance": float})


def _parameter_order(name: str) -> tuple[int, str]:
    order = ("family", *HYPERPARAMETERS)
    return (order.index(name) if name in order else len(order), name)


def parameter_slices(
    study: optuna.Study, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> pd.DataFrame:
    """Each complete trial's objective values against each parameter it sampled (a slice plot).

    Long: ``trial_number``, ``family``, ``parameter``, ``value``, ``position`` (where a
    categorical value sits among its distribution's choices; NaN for numbers), ``log_scale``,
    then one column per objective. A family's parameters appear only for its trials.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    names = objective_names(study, objectives)
    rows = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for trial in complete:
        for parameter in sorted(trial.params, key=_parameter_order):
            if parameter == "family":
                continue
            distribution = trial.distributions[parameter]
            row = {
                "trial_number": trial.number,
                "family": trial.params.get("family"),
                "parameter": parameter,
                "value": trial.params[parameter],
                "position": distribution.choices.index(trial.params[parameter])
                if isinstance(distribution, CategoricalDistribution)
                else math.nan,
                "log_scale": isinstance(distribution, FloatDistribution | IntDistribution)
                and distribution.log,
            }
            row.update({name: float(trial.values[index]) for index, name in enumerate(names)})
            rows.append(row)
    columns = [
        "trial_number",
        "family",
        "parameter",
        "value",
        "position",
        "log_scale",
        *names,
    ]
    return pd.DataFrame(rows, columns=columns)


def decision_summary(
    ranked: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> pd.DataFrame:
    """The recommended trial (rank 1), then the best-ranked trial of each family.

    Display strings: the val objectives the ranking used, and the test figures a decision
    rests on with their 95% intervals, as the terminal leaderboard shows them.
    """
    if ranked.empty:
        return pd.DataFrame()
    best_of_family = ranked.drop_duplicates("family")  # ranked is sorted, best first
    chosen = pd.concat([ranked.head(1), best_of_family], ignore_index=True)
    shown = compact_table(chosen, objectives).drop(columns=["imbalance"])
    roles = ["recommended"] + [f"best {family}" for family in best_of_family["family"]]
    shown.insert(0, "", roles)
    return shown
