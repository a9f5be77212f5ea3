"""The leaderboard: rank on validation, report on test.

For each trial the best-validation epoch (by the sweep's scheduler metric,
among epochs whose checkpoint is still in the trial folder, the latest of ties)
is chosen; its validation metrics rank the trial and its checkpoint is
evaluated once on val and on the held-out test split. A trial none of whose
checkpoints is left, or whose chosen checkpoint cannot be read, is listed apart
with the reason, like a trial that errored. The predictions are cached in the
trial folder as ``evaluation.json`` (``checkpoint``, and ``labels`` and
``probabilities`` of ``val`` and ``test``); a different best checkpoint makes
the cache stale. Every test column is computed from those saved predictions.
Test numbers never feed back into the search, and the val predictions serve
only to choose the threshold.

Only the top ``evaluate_top`` trials by validation rank are evaluated on test
(the sweep file's ``evaluate_top``, or the caller's; by default every trial when
there are at most 100, else the top 100): a 10,000-trial sweep is read in
minutes, not hours, and nobody reads past the first hundred rows. The others keep
empty test columns and ``test_evaluated`` false. Rank never depends on test. A
top trial whose checkpoint cannot be read moves to the failed trials and the
ranking is redone without it, so the next trial moves up and is evaluated in its
place: the top ``evaluate_top`` rows always have test columns. How checkpoints
are evaluated is the caller's choice (``evaluate``): in this process by default,
or as parallel tasks on a Ray cluster (``cxrtune.search.held_out``).

Trials are ranked by the sweep's ``objectives`` (by default
``val_covid_recall_at_spec`` and ``val_macro_auc``): the Pareto front first,
then each objective in order. ``val_covid_recall_at_spec`` is the val recall at
the ``threshold`` below; argmax ``val_covid_recall`` stays as a column.

The test columns, after the validation ones:

- ``test_covid_recall``, ``test_macro_auc``, ``test_accuracy``: argmax recall
  of the positive class, macro one-vs-rest AUC and accuracy on test;
- ``test_covid_recall_low``/``_high``, ``test_macro_auc_low``/``_high``: 95%
  stratified bootstrap percentile interval (the sweep's ``bootstrap_resamples``
  resamples, seed 0, class counts kept in every resample);
- ``threshold``: the lowest positive-class probability at which the model
  reaches the sweep's ``target_specificity`` on val (positive when
  ``probability >= threshold``; ``inf`` when no threshold reaches it);
- ``test_covid_recall_at_threshold``, ``test_specificity_at_threshold``: what
  that threshold gives on test; the recall with its bootstrap interval
  (``test_covid_recall_at_threshold_low``/``_high``), the threshold held fixed.

The table and Markdown styles show each interval beside its estimate, as
``0.933 [0.880, 0.970]``; the CSV keeps every column at full precision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.analysis.experiment import (
    CHECKPOINT_COLUMN,
    DEFAULT_BOOTSTRAP_RESAMPLES,
    EVALUATION_FILE,
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    Evaluator,
    Experiment,
    Predictions,
    TrialRecord,
    best_epoch_row,
)
from cxrtune.analysis.intervals import (
    INTERVAL_METRICS,
    metric_intervals,
    recall_and_specificity_at,
    threshold_for_specificity,
)
from cxrtune.analysis.ranking import DEFAULT_OBJECTIVES, rank_trials
from cxrtune.trainables.atomic import write_atomically
from cxrtune.trainables.metrics import (
    DEFAULT_TARGET_SPECIFICITY,
    classification_metrics,
    metric_mode,
    recall_at_specificity,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_EVALUATE_TOP",
    "HYPERPARAMETERS",
    "TEST_COLUMNS",
    "Leaderboard",
    "build_leaderboard",
    "ensemble_metrics",
    "first_line",
    "format_interval",
    "format_leaderboard",
    "format_number",
    "held_out_metrics",
    "resolve_evaluate_top",
    "write_leaderboard",
]

# Without an evaluate_top setting, a sweep of at most this many ranked trials has every
# trial evaluated on test, a larger one its top this many.
DEFAULT_EVALUATE_TOP = 100
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
# Metrics with a bootstrap interval, as classification_metrics names them; each
# gives test_<name>_low and test_<name>_high.
HYPERPARAMETERS = (
    "lr",
    "batch_size",
    "imbalance",
    "dropout",
    "weight_decay",
    "augment_strength",
    "finetune_blocks",
)
TEST_COLUMNS = (
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
# Metrics first, hyperparameters last, so the numbers that decide are read first.
COLUMNS = (
    "rank",
    "pareto_front",  # 1 = on the first Pareto front of the sweep's objectives
    "trial_id",
    "family",
    "pretrained",
    "epochs",
    "best_epoch",
    "val_covid_recall_at_spec",
    "val_covid_recall",
    "val_macro_auc",
    "test_evaluated",  # False: outside the top evaluate_top, the test columns are empty
    *TEST_COLUMNS,
    *HYPERPARAMETERS,
)


@dataclass(frozen=True)
class Leaderboard:
    """Ranked trials and, apart, the trials that errored or never reported."""

    ranked: pd.DataFrame
    failed: pd.DataFrame  # trial_id, family, error
    header: str
    checkpoints: dict[str, Path] = field(default_factory=dict)  # trial id -> chosen checkpoint
    # trial id -> split ("val", "test") -> predictions of the chosen checkpoint
    predictions: dict[str, dict[str, Predictions]] = field(default_factory=dict)
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES  # what the ranking used, in order


def unranked_reason(record: TrialRecord, metric: str) -> str:
    """Why ``best_epoch_row`` found no epoch of a trial that did not error."""
    results = record.results
    if results.empty:
        return "reported no epoch"
    if metric not in results or results[metric].isna().all():
        return f"reported no {metric}"
    named = []
    if CHECKPOINT_COLUMN in results:
        named = sorted(set(results[CHECKPOINT_COLUMN].dropna().astype(str)))
    if not named:
        return "reported no checkpoint"
    return (
        f"no checkpoint left: {', '.join(named)} "
        f"{'is' if len(named) == 1 else 'are'} missing from {record.directory}"
    )


def trial_row(
    record: TrialRecord, best: pd.Series, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> dict[str, Any]:
    """The leaderboard row of one trial, validation part only.

    A metric the trial never reported (an experiment older than the metric) is NaN.
    """
    config = record.config
    row: dict[str, Any] = {
        "trial_id": record.trial_id,
        "family": record.family,
        "pretrained": _is_pretrained(config),
    }
    row.update({name: config.get(name) for name in HYPERPARAMETERS})
    row["epochs"] = int(record.results["epoch"].max())
    row["best_epoch"] = int(best["epoch"])
    for name in dict.fromkeys(
        ["val_covid_recall_at_spec", "val_covid_recall", "val_macro_auc", *objectives]
    ):
        row[name] = float(best.get(name, math.nan))
    return row


def build_leaderboard(
    experiment: Experiment,
    *,
    evaluate_test: bool = True,
    device: str = "cpu",
    evaluate_top: int | None = None,
    evaluate: Evaluator | None = None,
    evaluate_trials: Collection[str] = (),
) -> Leaderboard:
    """Rank every trial that reported at least one epoch; list the others apart.

    The top ``evaluate_top`` trials by rank are evaluated on test (``None``: the sweep's
    ``evaluate_top``, else every trial up to 100, else the top 100). ``evaluate`` runs
    the checkpoints no ``evaluation.json`` holds yet; by default, in this process on
    ``device``. ``evaluate_trials`` are evaluated too, wherever they rank (``export`` of
    a trial below the top). A bad ``evaluate_top`` is a ``ValueError`` naming it.
    """
    metric = experiment.scheduler_metric
    mode = metric_mode(metric)
    records = {record.trial_id: record for record in experiment.trials}
    objectives = list(experiment.sweep.get("objectives") or DEFAULT_OBJECTIVES)
    # An objective the default columns lack (val_accuracy, say) is shown too.
    columns = [*COLUMNS, *(name for name in objectives if name not in COLUMNS)]
    rows, failed = [], []
    chosen: dict[str, str] = {}
    for record in experiment.trials:
        best = best_epoch_row(record.results, metric, mode, record.checkpoints)
        if record.error is not None or best is None:
            reason = record.error or unranked_reason(record, metric)
            failed.append({"trial_id": record.trial_id, "family": record.family, "error": reason})
            continue
        rows.append(trial_row(record, best, objectives))
        chosen[record.trial_id] = str(best[CHECKPOINT_COLUMN])

    computed_later = ("rank", "pareto_front", "test_evaluated", *TEST_COLUMNS)
    table = pd.DataFrame(rows, columns=[c for c in columns if c not in computed_later])
    predictions: dict[str, dict[str, Predictions]] = {}
    test: dict[str, dict[str, float]] = {}
    top = resolve_evaluate_top(experiment, evaluate_top, len(table)) if evaluate_test else 0
    evaluator = evaluate or _in_process_evaluator(device)
    ranked = rank_trials(table, objectives)
    # Rank on val alone, evaluate the top; an unreadable top checkpoint leaves the ranking
    # and the ranking is redone, which brings the next trial into the top.
    also = set(evaluate_trials) if evaluate_test else set()
    while wanted := [
        trial_id
        for position, trial_id in enumerate(ranked["trial_id"])
        if (position < top or trial_id in also) and trial_id not in test
    ]:
        found, found_predictions, unreadable = _evaluate_chosen_checkpoints(
            experiment, {trial_id: chosen[trial_id] for trial_id in wanted}, evaluator
        )
        test.update(found)
        predictions.update(found_predictions)
        for trial_id, reason in unreadable.items():
            failed.append(
                {"trial_id": trial_id, "family": records[trial_id].family, "error": reason}
            )
            del chosen[trial_id]
        if unreadable:
            table = table[~table["trial_id"].isin(unreadable)].reset_index(drop=True)
            ranked = rank_trials(table, objectives)
    ranked["test_evaluated"] = ranked["trial_id"].isin(test).astype(bool)
    for column in TEST_COLUMNS:
        ranked[column] = [
            test[trial_id][column] if trial_id in test else math.nan
            for trial_id in ranked["trial_id"]
        ]
    header = leaderboard_header(experiment)
    if evaluate_test and len(test) < len(ranked):
        header += (
            f"\nTest evaluated for {len(test)} of {len(ranked)} ranked trials (the top {top} "
            "by val rank: evaluate_top); the others are not evaluated and their test columns "
            "are empty."
        )
    return Leaderboard(
        ranked=ranked[columns],
        failed=pd.DataFrame(failed, columns=["trial_id", "family", "error"]),
        header=header,
        checkpoints={
            trial_id: records[trial_id].directory / name for trial_id, name in chosen.items()
        },
        predictions=predictions,
        objectives=tuple(objectives),
    )


def resolve_evaluate_top(experiment: Experiment, evaluate_top: int | None, ranked: int) -> int:
    """How many of ``ranked`` trials to evaluate on test: the caller's, the sweep's, or the default.

    A value that is not a positive integer is a ``ValueError`` naming ``evaluate_top``.
    """
    value = evaluate_top if evaluate_top is not None else experiment.sweep.get("evaluate_top")
    if value is None:
        return ranked if ranked <= DEFAULT_EVALUATE_TOP else DEFAULT_EVALUATE_TOP
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"evaluate_top must be a positive integer, got {value!r}")
    return value


def _in_process_evaluator(device: str) -> Evaluator:
    # torch loads only when checkpoints are evaluated, not for reading a leaderboard.
    from cxrtune.analysis.evaluation import evaluate_in_process

    return partial(evaluate_in_process, device=device)


def leaderboard_header(experiment: Experiment) -> str:
    """What a reader must know before trusting the numbers: data, splits, pretraining."""
    info = experiment.dataset
    source = "SYNTHETIC demo data (not real X-rays)" if info.synthetic else info.root
    sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in info.split_counts.items())
    pretrained = [record for record in experiment.trials if _is_pretrained(record.config)]
    weights = experiment.sweep.get("weights", "none")
    models = (
        f"{len(pretrained)} trial(s) started from pretrained VGG16 weights ({weights})"
        if pretrained
        else "no model was pretrained"
    )
    grouping = (
        f"grouped by {info.grouping} ({info.groups} groups)"
        if info.grouping != "none"
        else f"no patient or source ids ({info.groups} groups after joining duplicates)"
    )
    if info.test_source:
        test_images = sum(info.split_counts.get("test", {}).values())
        grouping += f"; test = external source {info.test_source} ({test_images} images)"
    target = experiment.target_specificity
    resamples = experiment.bootstrap_resamples
    return (
        f"Experiment: {experiment.directory}\n"
        f"Data: {source}; layout {info.layout}; {info.image_size}px; "
        f"positive class {info.positive_class}; {sizes}\n"
        f"Splits: {grouping}; {info.duplicate_images} exact-duplicate images kept together; "
        f"{info.skipped_images} images skipped; {info.dropped_images} dropped as conflicting\n"
        f"Models: {models}. Ranked on val (Pareto front of COVID recall at the target "
        "specificity and macro AUC); "
        "test is held out and reported only.\n"
        f"Test intervals: 95% stratified bootstrap, {resamples} resamples. Operating point: "
        f"COVID threshold chosen on val for specificity {target}, applied on test."
    )


def _is_pretrained(config: dict[str, Any]) -> bool:
    return config.get("family") == "vgg16" and config.get("weights", "none") != "none"


def held_out_metrics(
    predictions: dict[str, Predictions],
    class_names: Sequence[str],
    positive_index: int,
    *,
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY,
    resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
) -> dict[str, float]:
    """The test columns of one trial from its ``val`` and ``test`` predictions.

    Only the threshold comes from val; everything else is measured on test.
    """
    test, val = predictions["test"], predictions["val"]
    metrics = classification_metrics(test.labels, test.probabilities, class_names, positive_index)
    columns = {f"test_{name}": metrics[name] for name in ("covid_recall", "macro_auc", "accuracy")}
    threshold = threshold_for_specificity(
        val.labels == positive_index, val.probabilities[:, positive_index], target_specificity
    )
    recall, specificity = recall_and_specificity_at(
        test.labels == positive_index, test.probabilities[:, positive_index], threshold
    )
    columns["threshold"] = threshold
    columns["test_covid_recall_at_threshold"] = recall
    columns["test_specificity_at_threshold"] = specificity
    intervals = metric_intervals(
        test.labels,
        test.probabilities,
        class_names,
        positive_index,
        INTERVAL_METRICS,
        threshold=threshold,
        resamples=resamples,
        confidence=CONFIDENCE,
        seed=BOOTSTRAP_SEED,
    )
    for name, (low, high) in intervals.items():
        columns[f"test_{name}_low"], columns[f"test_{name}_high"] = low, high
    return columns


def ensemble_metrics(
    experiment: Experiment, leaderboard: Leaderboard, trial_ids: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Threshold and metrics of the trials' averaged probabilities, like a leaderboard row.

    Val and test predictions of the members are averaged; the threshold is chosen on the
    averaged val predictions, the test columns come from ``held_out_metrics``. A member
    without saved predictions is a ``ValueError``.
    """
    missing = [trial_id for trial_id in trial_ids if trial_id not in leaderboard.predictions]
    if missing:
        raise ValueError(f"trial(s) {missing} have no val and test predictions to average")
    averaged = {
        split: Predictions(
            labels=leaderboard.predictions[trial_ids[0]][split].labels,
            probabilities=np.mean(
                [leaderboard.predictions[t][split].probabilities for t in trial_ids], axis=0
            ),
        )
        for split in ("val", "test")
    }
    info = experiment.dataset
    target_specificity = experiment.target_specificity
    columns = held_out_metrics(
        averaged,
        info.class_names,
        info.positive_index,
        target_specificity=target_specificity,
        resamples=experiment.bootstrap_resamples,
    )
    val = classification_metrics(
        averaged["val"].labels, averaged["val"].probabilities, info.class_names, info.positive_index
    )
    threshold = columns.pop("threshold")
    metrics = {
        "val_covid_recall_at_spec": recall_at_specificity(
            averaged["val"].labels == info.positive_index,
            averaged["val"].probabilities[:, info.positive_index],
            target_specificity,
        ),
        "val_covid_recall": val["covid_recall"],
        "val_macro_auc": val["macro_auc"],
    }
    return threshold, {**metrics, **columns}


def _evaluate_chosen_checkpoints(
    experiment: Experiment, chosen: dict[str, str], evaluate: Evaluator
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Predictions]], dict[str, str]]:
    """Test columns and predictions of each trial's chosen checkpoint, and apart, by trial
    id, why a checkpoint could not be read.

    Predictions are cached in the trial folder (``evaluation.json``); only the checkpoints
    without a cached evaluation go to ``evaluate``, all in one call so that it may run them
    in parallel.
    """
    info = experiment.dataset
    target_specificity = experiment.target_specificity
    resamples = experiment.bootstrap_resamples
    by_id = {record.trial_id: record for record in experiment.trials}
    all_predictions: dict[str, dict[str, Predictions]] = {}
    missing: dict[str, Path] = {}
    for trial_id, checkpoint_name in chosen.items():
        cached = _read_evaluation(by_id[trial_id].directory / EVALUATION_FILE, checkpoint_name)
        if cached is None:
            missing[trial_id] = by_id[trial_id].directory / checkpoint_name
        else:
            all_predictions[trial_id] = cached
    unreadable: dict[str, str] = {}
    if missing:
        evaluated = evaluate(experiment, missing)
        unreadable = dict(evaluated.unreadable)
        for trial_id, found in evaluated.predictions.items():
            # Rounded before use, so a first build and any later one from the cache agree.
            rounded = {
                split: Predictions(predictions.labels, np.round(predictions.probabilities, 6))
                for split, predictions in found.items()
            }
            _write_evaluation(
                by_id[trial_id].directory / EVALUATION_FILE, chosen[trial_id], rounded
            )
            all_predictions[trial_id] = rounded
    results = {
        trial_id: held_out_metrics(
            predictions,
            info.class_names,
            info.positive_index,
            target_specificity=target_specificity,
            resamples=resamples,
        )
        for trial_id, predictions in all_predictions.items()
    }
    # In the order asked for, whichever way each evaluation came.
    ordered = [trial_id for trial_id in chosen if trial_id in all_predictions]
    return (
        {trial_id: results[trial_id] for trial_id in ordered},
        {trial_id: all_predictions[trial_id] for trial_id in ordered},
        unreadable,
    )


def _read_evaluation(path: Path, checkpoint_name: str) -> dict[str, Predictions] | None:
    """The cached predictions of ``checkpoint_name``; None if absent or of another checkpoint."""
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    if cached.get("checkpoint") != checkpoint_name:
        return None
    return {
        split: Predictions(
            labels=np.asarray(cached[split]["labels"], dtype=np.int64),
            probabilities=np.asarray(cached[split]["probabilities"], dtype=np.float64),
        )
        for split in ("val", "test")
    }


def _write_evaluation(
    path: Path, checkpoint_name: str, predictions: dict[str, Predictions]
) -> None:
    """Write ``evaluation.json`` whole or not at all, so a killed process leaves no half file."""
    document: dict[str, Any] = {"checkpoint": checkpoint_name}
    for split, split_predictions in predictions.items():
        document[split] = {
            "labels": split_predictions.labels.tolist(),
            "probabilities": split_predictions.probabilities.tolist(),
        }
    write_atomically(path, json.dumps(document))


def format_leaderboard(
    leaderboard: Leaderboard, *, top: int | None = None, style: str = "table"
) -> str:
    """Render as an aligned text table, CSV or Markdown."""
    ranked = leaderboard.ranked.head(top) if top else leaderboard.ranked
    shown = ranked.copy()
    for name in INTERVAL_METRICS:
        column = f"test_{name}"
        shown[column] = [
            format_interval(point, low, high)
            for point, low, high in zip(
                ranked[column], ranked[f"{column}_low"], ranked[f"{column}_high"], strict=True
            )
        ]
        shown = shown.drop(columns=[f"{column}_low", f"{column}_high"])
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(format_number)
    if "test_evaluated" in shown:
        shown["test_evaluated"] = shown["test_evaluated"].map(
            lambda evaluated: "yes" if evaluated else "not evaluated"
        )
    if style == "csv":
        return ranked.to_csv(index=False)
    if style == "md":
        body = shown.to_markdown(index=False, disable_numparse=True)
        failed_rows = leaderboard.failed.assign(error=leaderboard.failed["error"].map(first_line))
        failed = failed_rows.to_markdown(index=False) if len(failed_rows) else ""
        header = "\n".join(f"> {line}  " for line in leaderboard.header.splitlines())
        parts = [header, "", body]
        if failed:
            parts += ["", "Trials that failed:", "", failed]
        return "\n".join(parts) + "\n"
    if style == "table":
        parts = [
            leaderboard.header,
            "",
            shown.to_string(index=False) if len(shown) else "(no trial reported a result)",
        ]
        if len(leaderboard.failed):
            parts += ["", f"{len(leaderboard.failed)} trial(s) failed:"]
            parts += [
                f"  {row.trial_id} {row.family}: {first_line(str(row.error))}"
                for row in leaderboard.failed.itertuples()
            ]
        return "\n".join(parts)
    raise ValueError(f"unknown format {style!r}; known formats: table, csv, md")


def write_leaderboard(leaderboard: Leaderboard, directory: Path) -> None:
    """Write ``leaderboard.csv`` (every column, full precision) and ``leaderboard.md``."""
    leaderboard.ranked.to_csv(directory / LEADERBOARD_CSV, index=False)
    (directory / LEADERBOARD_MD).write_text(format_leaderboard(leaderboard, style="md"))


def format_number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3f}"


def format_interval(point: float, low: float, high: float) -> str:
    """``0.933 [0.880, 0.970]``; the estimate alone where the interval is undefined."""
    if math.isnan(low) or math.isnan(high):
        return format_number(point)
    return f"{format_number(point)} [{format_number(low)}, {format_number(high)}]"


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    # Python tracebacks end with the exception itself, the line that says what went wrong.
    return lines[-1].strip() if lines else text
