"""The replay's trial: a Tune class trainable that reports a surrogate's curve.

Kept apart from ``search_efficiency`` so that a replay worker imports Ray Tune and
nothing more: the surrogate (scikit-learn, pandas) lives in one ``CurveServer``
actor that every trial asks for its curve. Starting a worker is most of what a
replayed trial costs, and a benchmark run starts hundreds.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune


class ReplayTrial(tune.Trainable):
    """Reports one epoch of its config's curve per ``step``; the curve comes from ``curves``.

    A class trainable, not a function: a reused actor starts its next trial with a
    ``reset_config`` call instead of a new thread, and each epoch is one plain
    method call.
    """

    # ``tune.with_parameters`` adds ``curves`` to Tune's ``setup(config)``.
    def setup(self, config: dict[str, Any], curves: Any) -> None:  # type: ignore[override]
        self.curves = curves
        self.curve = ray.get(curves.curve.remote(config))

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self.curve = ray.get(self.curves.curve.remote(new_config))
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        return None  # nothing to save: the curve follows from the config

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None

    def step(self) -> dict[str, Any]:
        result = dict(self.curve[self.iteration])
        result["done"] = self.iteration + 1 == len(self.curve)
        return result
