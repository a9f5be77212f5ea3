"""Classification metrics from scikit-learn, as one flat dict per evaluation.

``covid`` in a key means the positive class, whatever its folder name. AUCs of
a class absent from ``labels`` are undefined and come out as NaN; the macro AUC
then averages the classes that are present (scikit-learn would refuse). With
two classes the macro AUC is the binary AUC of the positive class's scores.

``covid_recall_at_spec`` is the positive-class recall at the lowest probability
threshold whose specificity reaches ``target_specificity``: an operating point a
model that calls everything COVID cannot win, unlike the argmax recall.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "DEFAULT_TARGET_SPECIFICITY",
    "classification_metrics",
    "metric_mode",
    "metric_safe_name",
    "recall_at_specificity",
    "threshold_for_specificity",
]

DEFAULT_TARGET_SPECIFICITY = 0.95


def metric_mode(metric: str) -> str:
    """``"min"`` for losses, ``"max"`` for everything else a trial reports."""
    return "min" if metric.endswith("loss") else "max"


def metric_safe_name(class_name: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``: a class name usable in a metric key."""
    return re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    positive_index: int,
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY,
) -> dict[str, float]:
    """Accuracy, positive-class recall and precision, macro and per-class one-vs-rest AUC.

    ``probabilities`` is ``N x C`` with rows summing to 1. Predictions are the
    argmax; a class never predicted has precision 0 (not an error). Recall at
    ``target_specificity`` is NaN when the labels hold one side only.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(
            f"probabilities must be N x C = {len(labels)} x {len(class_names)}, "
            f"got {probabilities.shape}"
        )
    predictions = probabilities.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "covid_recall": float(
            recall_score(
                labels, predictions, labels=[positive_index], average="macro", zero_division=0
            )
        ),
        "covid_precision": float(
            precision_score(
                labels, predictions, labels=[positive_index], average="macro", zero_division=0
            )
        ),
    }
    metrics["covid_recall_at_spec"] = recall_at_specificity(
        labels == positive_index, probabilities[:, positive_index], target_specificity
    )
    per_class_auc = one_vs_rest_auc(labels, probabilities)
    metrics["macro_auc"] = macro_auc(per_class_auc, positive_index)
    for name, auc in zip(class_names, per_class_auc, strict=True):
        metrics[f"auc_{metric_safe_name(name)}"] = auc
    return metrics


def macro_auc(per_class_auc: Sequence[float], positive_index: int) -> float:
    """The mean AUC of the classes present; with two classes, the positive class's binary AUC.

    Two classes' one-vs-rest AUCs are one number (one column is 1 minus the
    other), so the macro AUC of a binary task is its binary AUC. Taking the
    positive class's own column keeps it equal, to the last digit, to the ROC
    curve of that class and to the bootstrap's point estimate.
    """
    if len(per_class_auc) == 2:
        return float(per_class_auc[positive_index])
    present = [auc for auc in per_class_auc if not math.isnan(auc)]
    return float(np.mean(present)) if present else math.nan


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """ROC AUC of each class against the rest; NaN where a class is absent or alone."""
    classes = list(range(probabilities.shape[1]))
    # scikit-learn's multi-class call wants more than two columns; the loop below
    # scores two classes (or a split missing a class) one column at a time.
    if len(classes) > 2 and set(np.unique(labels)) == set(classes):
        aucs = roc_auc_score(labels, probabilities, multi_class="ovr", average=None, labels=classes)
        return [float(auc) for auc in aucs]
    aucs = []
    for index in classes:
        is_class = labels == index
        if is_class.all() or not is_class.any():
            aucs.append(math.nan)
        else:
            aucs.append(float(roc_auc_score(is_class, probabilities[:, index])))
    return aucs


def threshold_for_specificity(
    is_positive: np.ndarray, scores: np.ndarray, target_specificity: float
) -> float:
    """The lowest score threshold whose specificity on these labels is at least the target.

    A sample is called positive when ``score >= threshold`` (scikit-learn's
    ``roc_curve`` convention). If no finite threshold reaches the target the
    answer is ``inf``: call nothing positive. Labels of one class only are a
    ``ValueError``: specificity or sensitivity would be undefined.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            "choosing a threshold needs both positive and negative labels, "
            f"got {positives} positive(s) and {negatives} negative(s)"
        )
    # Every distinct score is a candidate: the default drop_intermediate would drop the
    # inner points of a run of negatives, where the lowest threshold often lies.
    false_positive_rate, _, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    # Thresholds fall and the false positive rate rises along the curve, so the
    # thresholds that reach the target are a prefix and the lowest is its end.
    reaches_target = 1.0 - false_positive_rate >= target_specificity
    return float(thresholds[np.flatnonzero(reaches_target)[-1]])


def recall_at_specificity(
    is_positive: np.ndarray, scores: np.ndarray, target_specificity: float
) -> float:
    """Recall at ``threshold_for_specificity``'s threshold; NaN when a side is missing."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return math.nan
    threshold = threshold_for_specificity(is_positive, scores, target_specificity)
    return float((np.asarray(scores)[is_positive] >= threshold).mean())
