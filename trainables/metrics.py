"""Classification metrics from scikit-learn, as one flat dict per evaluation.

``covid`` in a key means the positive class, whatever its folder name. AUCs of
a class absent from ``labels`` are undefined and come out as NaN; the macro AUC
then averages the classes that are present (scikit-learn would refuse). With
two classes the macro AUC is the binary AUC of the positive class's scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score


def metric_safe_name(class_name: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``: a class name usable in a metric key."""
    return re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    positive_index: int,
) -> dict[str, float]:
    """Accuracy, positive-class recall and precision, macro and per-class one-vs-rest AUC.

    ``probabilities`` is ``N x C`` with rows summing to 1. Predictions are the
    argmax; a class never predicted has precision 0 (not an error).
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
