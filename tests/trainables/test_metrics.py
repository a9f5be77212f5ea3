from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from cxrtune.trainables.metrics import (
    classification_metrics,
    metric_safe_name,
    threshold_for_specificity,
)

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def random_case(seed: int, count: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(4), rng.integers(0, 4, count - 4)])
    probabilities = rng.dirichlet(np.ones(4), count)
    return labels, probabilities


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_scikit_learn(seed: int) -> None:
    labels, probabilities = random_case(seed)
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    predictions = probabilities.argmax(axis=1)
    assert metrics["covid_recall"] == pytest.approx(recall_score(labels == 0, predictions == 0))
    assert metrics["covid_precision"] == pytest.approx(
        precision_score(labels == 0, predictions == 0)
    )
    assert metrics["macro_auc"] == pytest.approx(
        roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    )
    for index, name in enumerate(CLASSES):
        expected = roc_auc_score(labels == index, probabilities[:, index])
        assert metrics[f"auc_{metric_safe_name(name)}"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))


def test_a_positive_class_never_predicted_has_zero_recall_and_precision() -> None:
    labels = np.array([0, 0, 1, 2, 3, 1])
    probabilities = np.tile([0.1, 0.5, 0.2, 0.2], (6, 1))
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert metrics["covid_recall"] == 0.0
    assert metrics["covid_precision"] == 0.0


def test_tied_scores_give_the_auc_scikit_learn_gives() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    probabilities = np.full((8, 4), 0.25)
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert metrics["macro_auc"] == pytest.approx(0.5)
    assert metrics["auc_covid"] == pytest.approx(roc_auc_score(labels == 0, probabilities[:, 0]))


def test_a_class_absent_from_the_labels_has_nan_auc_and_is_left_out_of_the_macro() -> None:
    labels, probabilities = random_case(7)
    labels = np.where(labels == 3, 2, labels)
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert math.isnan(metrics["auc_viral_pneumonia"])
    present = [roc_auc_score(labels == i, probabilities[:, i]) for i in range(3)]
    assert metrics["macro_auc"] == pytest.approx(np.mean(present))


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="N x C"):
        classification_metrics(np.array([0, 1]), np.ones((3, 4)) / 4, CLASSES, positive_index=0)


def test_class_names_become_metric_safe_keys() -> None:
    assert metric_safe_name("Viral Pneumonia") == "viral_pneumonia"
    assert metric_safe_name("COVID-19") == "covid_19"


@pytest.mark.parametrize("positive_index", [0, 1])
def test_two_classes_score_the_binary_auc_as_macro_auc(positive_index: int) -> None:
    """A two-class dataset (COVID versus Normal) gets its binary AUC, not a scikit-learn error."""
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], [6, 10])
    covid_score = rng.uniform(size=16) + 0.5 * (labels == 0)
    probabilities = np.stack([covid_score, 1 - covid_score], axis=1)
    metrics = classification_metrics(labels, probabilities, ("COVID", "Normal"), positive_index)
    binary = roc_auc_score(labels == positive_index, probabilities[:, positive_index])
    assert metrics["macro_auc"] == binary
    assert metrics["auc_covid"] == pytest.approx(binary)
    assert metrics["auc_normal"] == pytest.approx(binary)
    assert 0.5 < binary < 1.0


def test_two_classes_with_one_absent_have_no_auc() -> None:
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]])
    metrics = classification_metrics(np.array([1, 1]), probabilities, ("COVID", "Normal"), 0)
    assert math.isnan(metrics["macro_auc"]) and math.isnan(metrics["auc_covid"])
    assert metrics["covid_recall"] == 0.0


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_macro_auc_is_scikit_learns_for_two_three_and_four_classes(classes: int) -> None:
    rng = np.random.default_rng(classes)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, 40)])
    probabilities = rng.dirichlet(np.ones(classes), len(labels))
    names = ["COVID", "Normal", "Pneumonia", "Lung Opacity"][:classes]
    metrics = classification_metrics(labels, probabilities, names, positive_index=0)
    if classes == 2:
        expected = roc_auc_score(labels == 0, probabilities[:, 0])
    else:
        expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert metrics["macro_auc"] == pytest.approx(expected)
    assert sum(key.startswith("auc_") for key in metrics) == classes


def covid_scores_as_probabilities(covid_scores: np.ndarray) -> np.ndarray:
    """Rows with ``covid_scores`` as COVID's probability, the rest shared by the other classes."""
    rest = (1.0 - covid_scores[:, None]) / 3.0
    return np.hstack([covid_scores[:, None], np.repeat(rest, 3, axis=1)])


def test_recall_at_spec_matches_a_hand_computed_roc() -> None:
    """Issue item 1, an objective that cannot be gamed: val_covid_recall_at_spec by hand.

    Ten non-COVID images score 0.05, 0.15, ..., 0.95 for COVID; four COVID images
    score 0.30, 0.60, 0.90 and 0.97. Specificity 0.8 allows 2 of the 10 negatives at
    or above the threshold: at 0.85 those are 0.85 and 0.95 (specificity 0.8); the next
    lower score, 0.75, lets a third through (0.7). So the threshold is 0.85, and COVID
    images at or above it are 0.90 and 0.97: recall 2/4.
    """
    negatives = np.round(np.arange(0.05, 1.0, 0.1), 2)
    covid_scores = np.concatenate([negatives, [0.30, 0.60, 0.90, 0.97]])
    labels = np.concatenate([np.tile([1, 2, 3], 4)[:10], np.zeros(4, dtype=int)])
    probabilities = covid_scores_as_probabilities(covid_scores)

    assert threshold_for_specificity(labels == 0, covid_scores, 0.8) == pytest.approx(0.85)
    metrics = classification_metrics(
        labels, probabilities, CLASSES, positive_index=0, target_specificity=0.8
    )
    assert metrics["covid_recall_at_spec"] == pytest.approx(0.5)
    # The default operating point, specificity 0.95, lets no negative through: only
    # 0.97 is above the highest negative, 0.95.
    default = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert default["covid_recall_at_spec"] == pytest.approx(0.25)


def test_calling_everything_covid_wins_argmax_recall_but_not_recall_at_spec() -> None:
    """Issue item 1: the model that calls every image COVID scores 0 at the operating point."""
    labels = np.array([0, 0, 1, 2, 3, 1, 2, 3])
    probabilities = covid_scores_as_probabilities(np.full(len(labels), 0.9))
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert metrics["covid_recall"] == 1.0
    assert metrics["covid_recall_at_spec"] == 0.0


def test_recall_at_spec_is_nan_without_covid_images() -> None:
    labels = np.array([1, 2, 3, 1])
    probabilities = covid_scores_as_probabilities(np.array([0.1, 0.2, 0.3, 0.4]))
    metrics = classification_metrics(labels, probabilities, CLASSES, positive_index=0)
    assert math.isnan(metrics["covid_recall_at_spec"])
