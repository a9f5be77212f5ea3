from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cxrtune.analysis.ranking import pareto_front_rank, rank_trials


def test_non_dominated_rows_form_the_first_front() -> None:
    values = np.array([[0.9, 0.80], [0.7, 0.95], [0.6, 0.70], [0.9, 0.80], [0.5, 0.96]])
    assert pareto_front_rank(values).tolist() == [1, 1, 2, 1, 1]


def test_fronts_peel_off_in_order() -> None:
    values = np.array([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0], [2.5, 1.5]])
    assert pareto_front_rank(values).tolist() == [1, 2, 3, 2]


def test_nan_counts_as_worst() -> None:
    assert pareto_front_rank(np.array([[math.nan, 0.1], [0.1, 0.1]])).tolist() == [2, 1]


def test_trials_rank_by_front_then_recall_at_spec_then_macro_auc() -> None:
    table = pd.DataFrame(
        [
            {"trial_id": "a", "val_covid_recall_at_spec": 0.60, "val_macro_auc": 0.99},
            {"trial_id": "b", "val_covid_recall_at_spec": 0.95, "val_macro_auc": 0.80},
            {"trial_id": "c", "val_covid_recall_at_spec": 0.50, "val_macro_auc": 0.70},
            {"trial_id": "d", "val_covid_recall_at_spec": 0.80, "val_macro_auc": 0.90},
            {"trial_id": "e", "val_covid_recall_at_spec": 0.80, "val_macro_auc": 0.85},
        ]
    )
    ranked = rank_trials(table)
    # Front 1: b, d, a (by recall); front 2: e; front 3: c.
    assert ranked["trial_id"].tolist() == ["b", "d", "a", "e", "c"]
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5]
    assert ranked["pareto_front"].tolist() == [1, 1, 1, 2, 3]


def test_exact_ties_break_by_trial_id() -> None:
    table = pd.DataFrame(
        [
            {"trial_id": "z", "val_covid_recall_at_spec": 0.5, "val_macro_auc": 0.5},
            {"trial_id": "y", "val_covid_recall_at_spec": 0.5, "val_macro_auc": 0.5},
        ]
    )
    assert rank_trials(table)["trial_id"].tolist() == ["y", "z"]


def test_an_empty_table_ranks_to_an_empty_table() -> None:
    empty = pd.DataFrame(columns=["trial_id", "val_covid_recall_at_spec", "val_macro_auc"])
    assert rank_trials(empty).empty


def test_argmax_recall_is_no_objective_by_default() -> None:
    """Issue item 1: calling everything COVID (argmax recall 1.0) does not rank first."""
    table = pd.DataFrame(
        [
            {
                "trial_id": "all",
                "val_covid_recall": 1.0,
                "val_covid_recall_at_spec": 0.1,
                "val_macro_auc": 0.80,
            },
            {
                "trial_id": "good",
                "val_covid_recall": 0.7,
                "val_covid_recall_at_spec": 0.6,
                "val_macro_auc": 0.90,
            },
        ]
    )
    assert rank_trials(table)["trial_id"].tolist() == ["good", "all"]


def test_a_loss_objective_is_minimised() -> None:
    table = pd.DataFrame(
        [
            {"trial_id": "a", "val_loss": 0.9, "val_macro_auc": 0.9},
            {"trial_id": "b", "val_loss": 0.2, "val_macro_auc": 0.9},
        ]
    )
    ranked = rank_trials(table, ["val_loss", "val_macro_auc"])
    assert ranked["trial_id"].tolist() == ["b", "a"]
    assert ranked["pareto_front"].tolist() == [1, 2]


def test_one_and_two_objectives_give_the_fronts_of_the_pairwise_definition() -> None:
    """The fast sweep agrees with peeling fronts off by comparing every pair, ties and NaN too."""
    from cxrtune.analysis.ranking import _pairwise_fronts

    rng = np.random.default_rng(0)
    for objectives in (1, 2, 3):
        # Few distinct values, so many rows tie on one objective or on all of them.
        values = rng.integers(0, 6, (300, objectives)).astype(float)
        values[rng.random(values.shape) < 0.05] = math.nan
        expected = _pairwise_fronts(np.where(np.isnan(values), -np.inf, values))
        assert pareto_front_rank(values).tolist() == expected.tolist()


def test_ten_thousand_trials_rank_in_well_under_a_second() -> None:
    import time

    values = np.random.default_rng(1).random((10_000, 2))
    start = time.perf_counter()
    fronts = pareto_front_rank(values)
    assert time.perf_counter() - start < 1.0
    assert fronts.min() == 1 and fronts.max() > 50
