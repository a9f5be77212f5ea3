"""A surrogate of the recorded learning curves: (config, epoch) -> validation metrics.

Fitted with scikit-learn on ``benchmarks/data/curves.csv.gz`` (see
``record_curves``): one gradient-boosted regressor per metric on the config's
hyperparameters (learning rate and weight decay on a log scale, the family and
imbalance strategy one-hot) and the epoch. ``Surrogate.curve`` draws a trial's
whole curve: the model's prediction plus one offset per trial at the seed
spread measured on the configs recorded with several seeds (a seed shifts a
whole curve more than it jitters single epochs), clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.record_curves import CONFIG_COLUMNS, MAX_EPOCHS, TABLE
from cxrtune.spaces import FAMILIES, IMBALANCE_STRATEGIES

TARGETS = ("val_covid_recall_at_spec", "val_macro_auc")
FEATURES = (
    *(f"family_{name}" for name in FAMILIES),
    *(f"imbalance_{name}" for name in IMBALANCE_STRATEGIES),
    "log_lr",
    "log_batch_size",
    "dropout",
    "log_weight_decay",
    "augment_strength",
    "finetune_blocks",
    "epoch",
)


def features(rows: pd.DataFrame | Mapping[str, Any]) -> np.ndarray:
    """The model's inputs, one row per (config, epoch) row of ``rows``.

    ``rows``: a table, or a mapping of column name to a numpy array.
    """
    column = {name: np.asarray(rows[name]) for name in (*CONFIG_COLUMNS, "epoch")}
    inputs = {f"family_{name}": column["family"] == name for name in FAMILIES}
    inputs.update(
        {f"imbalance_{name}": column["imbalance"] == name for name in IMBALANCE_STRATEGIES}
    )
    inputs["log_lr"] = np.log10(column["lr"].astype(float))
    inputs["log_batch_size"] = np.log2(column["batch_size"].astype(float))
    inputs["dropout"] = column["dropout"].astype(float)
    # Weight decay 0 (baseline_cnn) sits below the space's lowest value.
    inputs["log_weight_decay"] = np.log10(column["weight_decay"].astype(float) + 1e-7)
    inputs["augment_strength"] = column["augment_strength"].astype(float)
    inputs["finetune_blocks"] = column["finetune_blocks"].astype(float)
    inputs["epoch"] = column["epoch"].astype(float)
    return np.column_stack([inputs[name].astype(float) for name in FEATURES])


def read_table(path: Path = TABLE) -> pd.DataFrame:
    """The recorded curves; a run with fewer than every epoch (being written) is left out."""
    table = pd.read_csv(path)
    complete = table.groupby(["config_id", "seed"])["epoch"].transform("nunique") == MAX_EPOCHS
    return table[complete].reset_index(drop=True)


def seed_spread(table: pd.DataFrame) -> dict[str, float]:
    """Per metric: the standard deviation across seeds of one (config, epoch), pooled."""
    repeated = table.groupby("config_id")["seed"].transform("nunique") > 1
    spread = {}
    for target in TARGETS:
        variances = table[repeated].groupby(["config_id", "epoch"])[target].var(ddof=1)
        spread[target] = float(math.sqrt(variances.mean())) if len(variances) else 0.0
    return spread


def family_epoch_seconds(table: pd.DataFrame) -> dict[str, float]:
    """Median seconds of one training epoch of each family, as recorded."""
    return {str(k): float(v) for k, v in table.groupby("family")["epoch_time_s"].median().items()}


@dataclass
class Surrogate:
    """Fitted models, the seed spread and each family's epoch cost."""

    models: dict[str, Any]
    spread: dict[str, float]
    epoch_cost: dict[str, float]  # family -> cost of one epoch, 1 = the families' mean

    def curve(self, config: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Validation metrics of every epoch of ``config``, as one noisy trial would see them.

        One array per metric, and ``epoch``: 1 to ``MAX_EPOCHS``.
        """
        epochs = np.arange(1, MAX_EPOCHS + 1)
        rows = {name: np.full(MAX_EPOCHS, config[name]) for name in CONFIG_COLUMNS}
        inputs = features({**rows, "epoch": epochs})
        curve = {"epoch": epochs}
        for target, model in self.models.items():
            offset = rng.normal(0.0, self.spread[target])
            curve[target] = np.clip(model.predict(inputs) + offset, 0.0, 1.0)
        return curve


def fit_surrogate(table: pd.DataFrame, seed: int = 0) -> Surrogate:
    """Fit one regressor per metric on every recorded row."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    inputs = features(table)
    models = {
        target: HistGradientBoostingRegressor(
            max_iter=300, learning_rate=0.05, random_state=seed
        ).fit(inputs, table[target].to_numpy())
        for target in TARGETS
    }
    seconds = family_epoch_seconds(table)
    mean = float(np.mean(list(seconds.values())))
    return Surrogate(
        models=models,
        spread=seed_spread(table),
        epoch_cost={family: value / mean for family, value in seconds.items()},
    )


def held_out_fit(table: pd.DataFrame, folds: int = 5) -> dict[str, dict[str, float]]:
    """R² and Spearman rank correlation per metric, on configs held out by group k-fold."""
    from scipy.stats import spearmanr
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    inputs = features(table)
    fit: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        truth = table[target].to_numpy()
        predicted = np.empty_like(truth)
        for train, test in GroupKFold(folds).split(inputs, truth, table["config_id"]):
            model = HistGradientBoostingRegressor(
                max_iter=300, learning_rate=0.05, random_state=0
            ).fit(inputs[train], truth[train])
            predicted[test] = model.predict(inputs[test])
        fit[target] = {
            "r2": float(r2_score(truth, predicted)),
            "spearman": float(spearmanr(truth, predicted).statistic),
        }
    return fit
