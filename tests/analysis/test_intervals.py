from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from cxrtune.analysis.intervals import (
    bootstrap_distribution,
    metric_intervals,
    percentile_interval,
    recall_and_specificity_at,
    stratified_bootstrap_ci,
    stratified_resamples,
    threshold_for_specificity,
)
from cxrtune.trainables.metrics import classification_metrics


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def separable_sample(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels, one positive in five, and scores that rank positives higher."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % 5 == 0).astype(int)
    return labels, labels + rng.normal(size=count)


# Ten negatives and three positives, by score: P .99, N .95, N .85, P .80, N .75 ... N .05,
# with the third positive at .30.
HAND_MADE_NEGATIVES = np.round(np.arange(0.05, 1.0, 0.1), 2)
HAND_MADE_SCORES = np.concatenate([HAND_MADE_NEGATIVES, [0.30, 0.80, 0.99]])
HAND_MADE_IS_POSITIVE = np.repeat([False, True], [10, 3])


def test_every_resample_keeps_the_class_counts_and_each_label_with_its_own_row() -> None:
    labels = np.repeat([0, 1, 2], [3, 7, 10])
    probabilities = np.eye(3)[labels]  # each row names its own class

    def counts_and_pairing(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
        return [*np.bincount(labels, minlength=3), (probabilities.argmax(axis=1) == labels).mean()]

    distribution = bootstrap_distribution(labels, probabilities, counts_and_pairing, resamples=200)
    assert distribution.shape == (200, 4)
    assert (distribution == [3, 7, 10, 1.0]).all()


def test_resamples_draw_with_replacement() -> None:
    distinct = [len(set(rows)) for rows in stratified_resamples(np.repeat([0, 1], 50), 100, 0)]
    # About 63% of the rows appear in a resample drawn with replacement, all of them without.
    assert 0.55 * 100 < np.mean(distinct) < 0.72 * 100


def test_the_interval_contains_the_estimate_of_a_reasonable_sample() -> None:
    labels, scores = separable_sample(300, seed=1)
    low, high = stratified_bootstrap_ci(labels, scores, auc, resamples=300)
    assert low < auc(labels, scores) < high
    assert high - low < 0.25


def test_the_interval_narrows_as_the_sample_grows() -> None:
    small = stratified_bootstrap_ci(*separable_sample(60, seed=2), auc, resamples=300)
    large = stratified_bootstrap_ci(*separable_sample(2400, seed=2), auc, resamples=300)
    # The width shrinks about as 1 / sqrt(count): forty times the data, a sixth of the width.
    assert large[1] - large[0] < (small[1] - small[0]) / 3


def test_the_interval_is_the_same_for_a_seed_and_changes_with_it() -> None:
    labels, scores = separable_sample(100, seed=3)
    first = stratified_bootstrap_ci(labels, scores, auc, resamples=200, seed=7)
    again = stratified_bootstrap_ci(labels, scores, auc, resamples=200, seed=7)
    other = stratified_bootstrap_ci(labels, scores, auc, resamples=200, seed=8)
    assert first == again
    assert first != other


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    labels, scores = separable_sample(100, seed=4)
    narrow = stratified_bootstrap_ci(labels, scores, auc, resamples=200, confidence=0.5)
    wide = stratified_bootstrap_ci(labels, scores, auc, resamples=200, confidence=0.95)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_undefined_resamples_are_dropped_from_the_interval() -> None:
    values = np.array([math.nan] * 4 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    expected = np.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.5, 97.5])
    assert percentile_interval(values) == pytest.approx(tuple(expected))


def test_an_interval_with_fewer_than_half_its_resamples_defined_is_undefined() -> None:
    values = np.array([math.nan] * 6 + [1.0, 2.0, 3.0, 4.0])
    assert all(math.isnan(bound) for bound in percentile_interval(values))
    labels, scores = separable_sample(20, seed=5)
    never_defined = stratified_bootstrap_ci(labels, scores, lambda y, p: math.nan, resamples=20)
    assert all(math.isnan(bound) for bound in never_defined)


@pytest.mark.parametrize(("classes", "positive_index"), [(2, 0), (2, 1), (3, 0), (4, 2)])
def test_metric_intervals_equal_one_bootstrap_per_metric(classes: int, positive_index: int) -> None:
    """Two classes included: the interval is around the binary AUC the leaderboard shows."""
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(classes), [6, 12, 12, 9][:classes])
    probabilities = rng.dirichlet(np.ones(classes), size=len(labels))
    probabilities += 0.3 * np.eye(classes)[labels]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    names = ("A", "B", "C", "D")[:classes]
    intervals = metric_intervals(
        labels, probabilities, names, positive_index, resamples=100, seed=3
    )
    for metric in ("covid_recall", "macro_auc"):
        alone = stratified_bootstrap_ci(
            labels,
            probabilities,
            lambda y, p, m=metric: classification_metrics(y, p, names, positive_index)[m],
            resamples=100,
            seed=3,
        )
        assert intervals[metric] == pytest.approx(alone, abs=1e-12)
    assert all(low < high for low, high in intervals.values())


def test_the_recall_at_the_val_chosen_threshold_gets_its_own_interval() -> None:
    """The operating point's recall, threshold held fixed, bootstrapped like the others."""
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1, 2], [8, 14, 14])
    probabilities = rng.dirichlet(np.ones(3), size=len(labels)) + 0.3 * np.eye(3)[labels]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    threshold = 0.4
    intervals = metric_intervals(
        labels,
        probabilities,
        ("A", "B", "C"),
        0,
        ("covid_recall_at_threshold",),
        threshold=threshold,
        resamples=100,
        seed=3,
    )
    alone = stratified_bootstrap_ci(
        labels,
        probabilities,
        lambda y, p: recall_and_specificity_at(y == 0, p[:, 0], threshold)[0],
        resamples=100,
        seed=3,
    )
    assert intervals["covid_recall_at_threshold"] == pytest.approx(alone, abs=1e-12)
    low, high = alone
    assert low < high
    no_threshold = metric_intervals(
        labels, probabilities, ("A", "B", "C"), 0, ("covid_recall_at_threshold",), resamples=10
    )
    assert all(math.isnan(bound) for bound in no_threshold["covid_recall_at_threshold"])


@pytest.mark.parametrize(("target", "expected"), [(0.8, 0.80), (0.85, 0.95), (0.5, 0.55)])
def test_the_threshold_is_the_lowest_score_reaching_the_target_specificity(
    target: float, expected: float
) -> None:
    threshold = threshold_for_specificity(HAND_MADE_IS_POSITIVE, HAND_MADE_SCORES, target)
    assert threshold == expected
    _, specificity = recall_and_specificity_at(HAND_MADE_IS_POSITIVE, HAND_MADE_SCORES, threshold)
    assert specificity >= target
    false_positive_rate, _, candidates = roc_curve(
        HAND_MADE_IS_POSITIVE, HAND_MADE_SCORES, drop_intermediate=False
    )
    assert (1 - false_positive_rate[candidates < threshold] < target).all()


def test_a_target_no_score_reaches_calls_nothing_positive() -> None:
    is_positive = np.array([False, True, False, True])
    scores = np.array([0.9, 0.8, 0.1, 0.2])  # the top score is a negative
    threshold = threshold_for_specificity(is_positive, scores, 0.9)
    assert threshold == math.inf
    assert recall_and_specificity_at(is_positive, scores, threshold) == (0.0, 1.0)


@pytest.mark.parametrize("is_positive", [np.ones(5, dtype=bool), np.zeros(5, dtype=bool)])
def test_labels_of_one_class_cannot_choose_a_threshold(is_positive: np.ndarray) -> None:
    with pytest.raises(ValueError, match="both positive and negative labels"):
        threshold_for_specificity(is_positive, np.linspace(0, 1, 5), 0.95)


def test_a_score_equal_to_the_threshold_is_called_positive() -> None:
    is_positive = np.array([True, True, True, False, False, False, False])
    scores = np.array([0.9, 0.5, 0.1, 0.5, 0.2, 0.3, 0.6])
    recall, specificity = recall_and_specificity_at(is_positive, scores, 0.5)
    assert recall == pytest.approx(2 / 3)
    assert specificity == 0.5


def test_recall_without_positives_is_undefined() -> None:
    recall, specificity = recall_and_specificity_at(np.zeros(4, dtype=bool), np.arange(4), 2)
    assert math.isnan(recall) and specificity == 0.5


def test_two_class_intervals_bootstrap_the_positive_class_binary_auc_when_scores_saturate() -> None:
    """Saturated float32 softmax: 1 - p rounds tiny p to 1.0, so only one column keeps the order.

    The interval must be around the binary AUC of the positive class's column, which is the
    leaderboard's macro AUC for two classes; averaging both columns would count ties.
    """
    labels = np.repeat([0, 1], [8, 8])
    # COVID and Normal images alternate among the tiny COVID scores (2, 4, 6, 8 and 1, 3, 5, 7
    # times 1e-9): column 0 orders them, column 1 rounds them all to 1.0.
    tiny = np.arange(1, 9) * 1e-9
    covid = np.concatenate([tiny[1::2], [0.6, 0.7, 0.8, 0.3], tiny[::2], [0.1, 0.2, 0.65, 0.4]])
    probabilities = np.stack([covid, 1 - covid], axis=1).astype(np.float32)
    names = ("COVID", "Normal")
    assert len(np.unique(probabilities[:, 1])) < len(np.unique(probabilities[:, 0]))
    intervals = metric_intervals(labels, probabilities, names, 0, resamples=200, seed=1)
    alone = stratified_bootstrap_ci(
        labels,
        probabilities,
        lambda y, p: auc(y == 0, p[:, 0]),
        resamples=200,
        seed=1,
    )
    assert intervals["macro_auc"] == pytest.approx(alone, abs=1e-12)
