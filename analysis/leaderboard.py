"""The leaderboard: rank on validation, report on test.

For each trial the best-validation epoch (by the sweep's scheduler metric,
among epochs whose checkpoint was kept) is chosen; its validation metrics rank
the trial and its checkpoint is evaluated once on the held-out test split.
Test numbers never feed back into the search.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.analysis.experiment import (
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    SPLITS_FILE,
    Experiment,
    TrialRecord,
)
from cxrtune.analysis.ranking import DEFAULT_OBJECTIVES, rank_trials

TEST_EVALUATION_FILE = "test_evaluation.json"
HYPERPARAMETERS = (
    "lr",
    "batch_size",
    "imbalance",
    "dropout",
    "weight_decay",
    "augment_strength",
    "finetune_blocks",
)
COLUMNS = (
    "rank",
    "trial_id",
    "family",
    "pretrained",
    *HYPERPARAMETERS,
    "epochs",
    "best_epoch",
    "val_covid_recall",
    "val_macro_auc",
    "test_covid_recall",
    "test_macro_auc",
    "test_accuracy",
)


@dataclass(frozen=True)
class Leaderboard:
    """Ranked trials and, apart, the trials that errored or never reported."""

    ranked: pd.DataFrame
    failed: pd.DataFrame  # trial_id, family, error
    header: str


def best_epoch_row(results: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The reported epoch with the best ``metric`` among those with a checkpoint on disk.

    Earlier epochs win ties, so a plateau picks the cheaper model.
    """
    if results.empty or metric not in results:
        return None
    candidates = results
    if "checkpoint_dir_name" in results:
        candidates = results[results["checkpoint_dir_name"].notna()]
    candidates = candidates[candidates[metric].notna()]
    if candidates.empty:
        return None
    position = (
        candidates[metric].to_numpy().argmax()
        if mode == "max"
        else candidates[metric].to_numpy().argmin()
    )
    return candidates.iloc[int(position)]


def trial_row(record: TrialRecord, best: pd.Series) -> dict[str, Any]:
    """The leaderboard row of one trial, validation part only."""
    config = record.config
    row: dict[str, Any] = {
        "trial_id": record.trial_id,
        "family": record.family,
        "pretrained": config.get("family") == "vgg16" and config.get("weights", "none") != "none",
    }
    row.update({name: config.get(name) for name in HYPERPARAMETERS})
    row["epochs"] = int(record.results["epoch"].max())
    row["best_epoch"] = int(best["epoch"])
    row["val_covid_recall"] = float(best["val_covid_recall"])
    row["val_macro_auc"] = float(best["val_macro_auc"])
    return row


def build_leaderboard(
    experiment: Experiment, *, evaluate_test: bool = True, device: str = "cpu"
) -> Leaderboard:
    """Rank every trial that reported at least one epoch; list the others apart."""
    metric = str(experiment.sweep.get("scheduler_metric", "val_macro_auc"))
    mode = "min" if metric.endswith("loss") else "max"
    rows, failed = [], []
    chosen: dict[str, str] = {}
    for record in experiment.trials:
        best = best_epoch_row(record.results, metric, mode)
        if record.error is not None or best is None:
            reason = record.error or "reported no epoch"
            failed.append({"trial_id": record.trial_id, "family": record.family, "error": reason})
            continue
        rows.append(trial_row(record, best))
        chosen[record.trial_id] = str(best.get("checkpoint_dir_name", ""))

    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    if evaluate_test and rows:
        test = _evaluate_on_test(experiment, chosen, device)
        for column in ("test_covid_recall", "test_macro_auc", "test_accuracy"):
            table[column] = table["trial_id"].map(lambda trial_id, c=column: test[trial_id][c])
    ranked = rank_trials(table, DEFAULT_OBJECTIVES).drop(columns="pareto_front")
    return Leaderboard(
        ranked=ranked[list(COLUMNS)],
        failed=pd.DataFrame(failed, columns=["trial_id", "family", "error"]),
        header=leaderboard_header(experiment),
    )


def leaderboard_header(experiment: Experiment) -> str:
    """What a reader must know before trusting the numbers: data, splits, pretraining."""
    info = experiment.dataset
    source = "SYNTHETIC demo data (not real X-rays)" if info.synthetic else info.root
    sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in info.split_counts.items())
    weights = experiment.sweep.get("weights", "none")
    return (
        f"Experiment: {experiment.directory}\n"
        f"Data: {source}; {info.image_size}px; positive class {info.positive_class}; {sizes}\n"
        f"VGG16 weights: {weights}. Ranked on val (Pareto front of COVID recall and macro AUC); "
        "test is held out and reported only."
    )


def _evaluate_on_test(
    experiment: Experiment, chosen: dict[str, str], device: str
) -> dict[str, dict[str, float]]:
    """Test metrics of each trial's chosen checkpoint, cached in the trial folder."""
    from cxrtune.analysis.test_evaluation import TestSet, evaluate_checkpoint

    by_id = {record.trial_id: record for record in experiment.trials}
    results: dict[str, dict[str, float]] = {}
    test_set: TestSet | None = None
    for trial_id, checkpoint_name in chosen.items():
        record = by_id[trial_id]
        cache = record.directory / TEST_EVALUATION_FILE
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("checkpoint") == checkpoint_name:
                results[trial_id] = cached["metrics"]
                continue
        checkpoint = record.directory / checkpoint_name
        if not checkpoint_name or not checkpoint.is_dir():
            results[trial_id] = {
                key: math.nan for key in ("test_covid_recall", "test_macro_auc", "test_accuracy")
            }
            continue
        if test_set is None:
            test_set = TestSet.load(experiment.dataset, experiment.directory / SPLITS_FILE)
        metrics, probabilities = evaluate_checkpoint(checkpoint, test_set, device)
        results[trial_id] = metrics
        cache.write_text(
            json.dumps(
                {
                    "checkpoint": checkpoint_name,
                    "metrics": metrics,
                    "labels": test_set.labels.tolist(),
                    "probabilities": np.round(probabilities, 6).tolist(),
                }
            )
        )
    return results


def format_leaderboard(
    leaderboard: Leaderboard, *, top: int | None = None, style: str = "table"
) -> str:
    """Render as an aligned text table, CSV or Markdown."""
    ranked = leaderboard.ranked.head(top) if top else leaderboard.ranked
    shown = ranked.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(_format_number)
    if style == "csv":
        return ranked.to_csv(index=False)
    if style == "md":
        body = shown.to_markdown(index=False, disable_numparse=True)
        failed_rows = leaderboard.failed.assign(error=leaderboard.failed["error"].map(_first_line))
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
                f"  {row.trial_id} {row.family}: {_first_line(str(row.error))}"
                for row in leaderboard.failed.itertuples()
            ]
        return "\n".join(parts)
    raise ValueError(f"unknown format {style!r}; known formats: table, csv, md")


def write_leaderboard(leaderboard: Leaderboard, directory: Path) -> None:
    """Write ``leaderboard.csv`` (every column, full precision) and ``leaderboard.md``."""
    leaderboard.ranked.to_csv(directory / LEADERBOARD_CSV, index=False)
    (directory / LEADERBOARD_MD).write_text(format_leaderboard(leaderboard, style="md"))


def _format_number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3f}"


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    # Python tracebacks end with the exception itself, the line that says what went wrong.
    return lines[-1].strip() if lines else text
