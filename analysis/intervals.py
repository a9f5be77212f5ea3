"""Uncertainty and operating points of test numbers, from saved labels and probabilities.

Pure numpy and scikit-learn, so it is tested on inline arrays:

- stratified bootstrap percentile intervals: each resample draws, with
  replacement, within each class, so every resample keeps the class counts of
  the split (a small positive class never vanishes from a resample);
- the positive-class threshold that reaches a target specificity, chosen on
  validation predictions, and the sensitivity and specificity it gives on test.

The bootstrapped metrics are those of ``classification_metrics``, so an interval
is always around the same definition as the point estimate beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import confusion_matrix

# One definition of the operating point for the per-epoch metric and the leaderboard.
from cxrtune.trainables.metrics import threshold_for_specificity

__all__ = [
    "bootstrap_distribution",
    "metric_intervals",
    "percentile_interval",
    "recall_and_specificity_at",
    "stratified_bootstrap_ci",
    "stratified_resamples",
    "threshold_for_specificity",
]

# The metrics ``metric_intervals`` bootstraps; the last needs the operating point's threshold.
INTERVAL_METRICS = ("covid_recall", "macro_auc", "covid_recall_at_threshold")
# labels, probabilities -> a number, or one number per metric; NaN where undefined.
Statistic = Callable[[np.ndarray, np.ndarray], float | Sequence[float]]


def stratified_resamples(labels: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample, drawn with replacement within each class.

    Every resample has exactly the class counts of ``labels``; deterministic for a seed.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(rows, size=len(rows), replace=True) for rows in members])


def bootstrap_distribution(
    labels: np.ndarray,
    probabilities: np.ndarray,
    statistic: Statistic,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """``statistic`` on each stratified resample: ``resamples`` values, or ``resamples x K``."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    values = [
        statistic(labels[rows], probabilities[rows])
        for rows in stratified_resamples(labels, resamples, seed)
    ]
    return np.asarray(values, dtype=np.float64)


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap ``values``.

    NaN values (resamples where the statistic is undefined) are dropped; if
    fewer than half of the values remain the interval is ``(nan, nan)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    if len(defined) == 0 or len(defined) < len(values) / 2:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def stratified_bootstrap_ci(
    labels: np.ndarray,
    probabilities: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified bootstrap percentile interval of ``statistic(labels, probabilities)``.

    Resamples keep the class counts (see ``stratified_resamples``); resamples
    where the statistic is NaN are dropped, and fewer than half left gives
    ``(nan, nan)``.
    """
    values = bootstrap_distribution(
        labels, probabilities, statistic, resamples=resamples, seed=seed
    )
    return percentile_interval(values, confidence)


def metric_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    positive_index: int,
    names: Sequence[str] = ("covid_recall", "macro_auc"),
    *,
    threshold: float = math.nan,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Stratified bootstrap intervals of ``INTERVAL_METRICS``, all resamples at once.

    The metrics are those of ``classification_metrics`` (argmax recall of the
    positive class; the mean one-vs-rest AUC of the classes present, or with
    two classes the positive class's binary AUC) and the positive-class recall when it
    is called at ``probability >= threshold`` (the operating point chosen on val), computed
    for every resample in one array operation: AUC is the Mann-Whitney U
    statistic over ``n_positive * n_negative``, which is what ``roc_auc_score``
    computes, ties counting half. The intervals equal ``stratified_bootstrap_ci``
    of ``classification_metrics`` with the same seed, at a thousandth of the cost.
    """
    unknown = sorted(set(names) - set(INTERVAL_METRICS))
    if unknown:
        raise ValueError(f"no bootstrap for {unknown}; supported: {list(INTERVAL_METRICS)}")
    if probabilities.shape[1] != len(class_names):
        raise ValueError(
            f"{probabilities.shape[1]} probability columns for {len(class_names)} classes"
        )
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    rows = np.stack(list(stratified_resamples(labels, resamples, seed)))
    # Every resample lists the classes in the same order and counts, so one row of
    # labels describes the columns of all of them.
    column_labels = labels[rows[0]]
    values: dict[str, np.ndarray] = {}
    if "covid_recall" in names:
        is_positive = column_labels == positive_index
        predictions = probabilities.argmax(axis=1)[rows[:, is_positive]]
        values["covid_recall"] = (
            (predictions == positive_index).mean(axis=1)
            if is_positive.any()
            else np.full(resamples, math.nan)
        )
    if "covid_recall_at_threshold" in names:
        is_positive = column_labels == positive_index
        called = probabilities[:, positive_index][rows[:, is_positive]] >= threshold
        values["covid_recall_at_threshold"] = (
            called.mean(axis=1)
            if is_positive.any() and not math.isnan(threshold)
            else np.full(resamples, math.nan)
        )
    if "macro_auc" in names:
        per_class = []
        scored = [positive_index] if len(class_names) == 2 else range(len(class_names))
        for index in scored:
            members = column_labels == index
            if members.all() or not members.any():
                continue  # undefined for this class, as in classification_metrics
            scores = probabilities[rows, index]
            u_statistic = mannwhitneyu(
                scores[:, members], scores[:, ~members], axis=1, method="asymptotic"
            ).statistic
            per_class.append(u_statistic / (members.sum() * (~members).sum()))
        values["macro_auc"] = (
            np.mean(per_class, axis=0) if per_class else np.full(resamples, math.nan)
        )
    return {name: percentile_interval(values[name], confidence) for name in names}


def recall_and_specificity_at(
    is_positive: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Sensitivity (positive recall) and specificity of calling ``score >= threshold`` positive.

    Either is NaN when the labels hold no positives, or no negatives.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    called_positive = np.asarray(scores) >= threshold
    true_negatives, false_positives, false_negatives, true_positives = confusion_matrix(
        is_positive, called_positive, labels=[False, True]
    ).ravel()
    positives = true_positives + false_negatives
    negatives = true_negatives + false_positives
    sensitivity = true_positives / positives if positives else math.nan
    specificity = true_negatives / negatives if negatives else math.nan
    return float(sensitivity), float(specificity)
