"""Ranking trials: Pareto front rank over the objectives, then tie-breaks.

Pure pandas and numpy on a table with one row per trial, so it is tested on
inline records.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# The default order: Pareto front over (val COVID recall at the target specificity,
# val macro AUC), then each of them in turn. Argmax COVID recall is no objective:
# a model that calls everything COVID would win it.
DEFAULT_OBJECTIVES = ("val_covid_recall_at_spec", "val_macro_auc")


def pareto_front_rank(values: np.ndarray) -> np.ndarray:
    """Front number (1 = non-dominated) of each row of ``values``, all objectives maximised.

    A row is dominated when another is at least as good on every objective and
    better on one. NaN counts as the worst possible value.
    """
    values = np.where(np.isnan(values), -np.inf, np.asarray(values, dtype=float))
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
    signs = np.array([-1.0 if name.endswith("loss") else 1.0 for name in objectives])
    values = table[list(objectives)].to_numpy(dtype=float) * signs
    ranked = table.assign(pareto_front=pareto_front_rank(values))
    sort_keys = ["pareto_front", *objectives, "trial_id"]
    ascending = [True] + [bool(sign < 0) for sign in signs] + [True]
    ranked = ranked.sort_values(sort_keys, ascending=ascending, na_position="last", kind="stable")
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)
