"""Ranking trials: Pareto front rank over the objectives, then tie-breaks.

Pure pandas and numpy on a table with one row per trial, so it is tested on
inline records.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrtune.trainables.metrics import metric_mode

__all__ = ["DEFAULT_OBJECTIVES", "pareto_front_rank", "rank_trials"]

# The default order: Pareto front over (val COVID recall at the target specificity,
# val macro AUC), then each of them in turn. Argmax COVID recall is no objective:
# a model that calls everything COVID would win it.
DEFAULT_OBJECTIVES = ("val_covid_recall_at_spec", "val_macro_auc")


def pareto_front_rank(values: np.ndarray) -> np.ndarray:
    """Front number (1 = non-dominated) of each row of ``values``, all objectives maximised.

    A row is dominated when another is at least as good on every objective and
    better on one. NaN counts as the worst possible value. One or two objectives
    (what a sweep file allows) take O(n log n), so a 10,000-trial sweep ranks in
    well under a second; more objectives peel the fronts off pairwise.
    """
    values = np.where(np.isnan(values), -np.inf, np.asarray(values, dtype=float))
    if values.ndim != 2 or len(values) == 0:
        return np.zeros(len(values), dtype=int)
    # Equal rows share their front and never dominate each other: rank the distinct
    # rows, then give every row the front of its distinct row.
    distinct, inverse = np.unique(values, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if distinct.shape[1] == 1:
        # np.unique sorts ascending: the largest value is front 1.
        fronts = np.arange(len(distinct), 0, -1)
    elif distinct.shape[1] == 2:
        fronts = _two_objective_fronts(distinct)
    else:
        fronts = _pairwise_fronts(distinct)
    return fronts[inverse]


def _two_objective_fronts(distinct: np.ndarray) -> np.ndarray:
    """Fronts of distinct rows of two objectives, by one sweep in decreasing order.

    Visited by the first objective, then the second, both decreasing, every row
    that dominates a row comes before it. Within a front the second objective then
    rises strictly, so a front's latest row holds its largest second value; a row
    joins the first front whose largest second value is below its own (those values
    fall from front to front, so a bisection finds it).
    """
    order = np.lexsort((-distinct[:, 1], -distinct[:, 0]))
    negated_best: list[float] = []  # per front, minus its largest second value (rising)
    fronts = np.zeros(len(distinct), dtype=int)
    for index in order:
        second = -float(distinct[index, 1])
        front = bisect.bisect_right(negated_best, second)
        if front == len(negated_best):
            negated_best.append(second)
        else:
            negated_best[front] = second
        fronts[index] = front + 1
    return fronts


def _pairwise_fronts(values: np.ndarray) -> np.ndarray:
    """Fronts by peeling off the non-dominated rows, comparing every pair: O(n^2) per front."""
    count = len(values)
    ranks = np.zeros(count, dtype=int)
    remaining = np.ones(count, dtype=bool)
    front = 0
    while remaining.any():
        front += 1
        candidates = values[remaining]
        at_least = (candidates[:, None, :] >= candidates[None, :, :]).all(axis=2)
        better = (candidates[:, None, :] > candidates[None, :, :]).any(axis=2)
        dominated = (at_least & better).any(axis=0)  # column j is dominated by some row i
        indices = np.flatnonzero(remaining)[~dominated]
        ranks[indices] = front
        remaining[indices] = False
    return ranks


def rank_trials(
    table: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> pd.DataFrame:
    """Sort trials by Pareto front, then each objective in turn (best first); add ``rank``.

    Losses (names ending in ``loss``) are minimised, everything else maximised.
    ``trial_id`` breaks the remaining ties so the order is deterministic.
    """
    if table.empty:
        return table.assign(pareto_front=pd.Series(dtype=int), rank=pd.Series(dtype=int))
    signs = np.array([-1.0 if metric_mode(name) == "min" else 1.0 for name in objectives])
    values = table[list(objectives)].to_numpy(dtype=float) * signs
    ranked = table.assign(pareto_front=pareto_front_rank(values))
    sort_keys = ["pareto_front", *objectives, "trial_id"]
    ascending = [True] + [bool(sign < 0) for sign in signs] + [True]
    ranked = ranked.sort_values(sort_keys, ascending=ascending, na_position="last", kind="stable")
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)
