"""A compact progress display: one line per trial epoch, start, stop and error.

Each line carries the elapsed time and an estimate of the time left, from the trial-epochs
finished so far and the sweep's budget under ASHA's expected cuts.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from cxrtune.trainables.failures import TRIAL_ERROR_KEY

__all__ = ["SweepProgress", "expected_epochs_left", "format_duration"]


def expected_epochs_left(
    epochs_done: int, max_epochs: int, grace_period: int, reduction_factor: int
) -> float:
    """Epochs a trial that has run ``epochs_done`` is expected to run still under ASHA.

    ASHA decides at rungs ``grace_period * reduction_factor**k`` (below ``max_epochs``) and
    lets about one trial in ``reduction_factor`` go on past each. A trial standing at a rung
    has not been decided yet, so that rung still cuts it.
    """
    rungs = set()
    rung = grace_period
    while rung < max_epochs:
        rungs.add(rung)
        rung *= reduction_factor
    surviving, expected = 1.0, 0.0
    for epoch in range(epochs_done + 1, max_epochs + 1):
        if epoch - 1 in rungs:
            surviving /= reduction_factor
        expected += surviving
    return expected


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``: short enough for every progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SweepProgress(Callback):
    """Prints what each trial is doing, with a running count and an estimate of time left."""

    def __init__(
        self,
        num_samples: int,
        max_epochs: int,
        grace_period: int | None = None,
        reduction_factor: int = 2,
    ):
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        # Without a grace period (no early stopping) every trial runs max_epochs.
        self.grace_period = max_epochs if grace_period is None else grace_period
        self.reduction_factor = reduction_factor
        self.started = time.monotonic()
        self.finished = 0
        self.errored = 0
        self.stopped_early = 0
        self.counted_earlier_trials = False
        self.epochs_reported = 0  # since this driver started: the rate's denominator
        self.running_epochs: dict[str, int] = {}  # trial id -> epochs done, for running trials

    def setup(self, *args: Any, **info: Any) -> None:
        self.started = time.monotonic()  # a resumed sweep is timed from its resumption

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.counted_earlier_trials:
            # A resumed sweep starts with the trials that ended before its driver died,
            # and with the epochs its interrupted trials had already run.
            ended = [trial for trial in trials if trial.status in ("TERMINATED", "ERROR")]
            self.errored = sum(
                trial.status == "ERROR" or TRIAL_ERROR_KEY in (trial.last_result or {})
                for trial in ended
            )
            self.finished = len(ended) - self.errored
            for trial in trials:
                epochs = (trial.last_result or {}).get("epoch")
                if trial.status not in ("TERMINATED", "ERROR") and epochs:
                    self.running_epochs[trial.trial_id] = int(epochs)
            self.counted_earlier_trials = True

    def epochs_left(self) -> float:
        """Trial-epochs the sweep is expected to run still."""
        ended = self.finished + self.errored
        not_started = max(self.num_samples - ended - len(self.running_epochs), 0)
        budget = (self.max_epochs, self.grace_period, self.reduction_factor)
        return not_started * expected_epochs_left(0, *budget) + sum(
            expected_epochs_left(epochs, *budget) for epochs in self.running_epochs.values()
        )

    def time_left(self, elapsed_s: float) -> str:
        if self.finished + self.errored >= self.num_samples:
            return "done"
        if not self.epochs_reported:
            return "estimating"
        return "~" + format_duration(self.epochs_left() * elapsed_s / self.epochs_reported)

    def _print(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        done = self.finished + self.errored
        left = self.time_left(elapsed)
        # sys.stdout is looked up on each call: the Tuner pickles its callbacks, and a
        # stream held as an attribute would not pickle.
        line = (
            f"[{format_duration(elapsed):>6} {left + ' left':>16} {done:3d}/{self.num_samples}]"
            f" {message}"
        )
        print(line, file=sys.stdout, flush=True)

    @staticmethod
    def _name(trial: Any) -> str:
        return f"{trial.trial_id} {trial.config.get('family', '?'):<15}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running_epochs.setdefault(trial.trial_id, 0)
        self._print(f"{self._name(trial)} started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if TRIAL_ERROR_KEY in result:
            self._print(f"{self._name(trial)} ERROR, not retried: {result[TRIAL_ERROR_KEY]}")
            return
        self.epochs_reported += 1
        self.running_epochs[trial.trial_id] = int(result.get("epoch", 0))
        self._print(
            f"{self._name(trial)} epoch {result.get('epoch', '?')}/{self.max_epochs}"
            f"  val_recall@spec {result.get('val_covid_recall_at_spec', float('nan')):.3f}"
            f"  val_macro_auc {result.get('val_macro_auc', float('nan')):.3f}"
            f"  ({result.get('epoch_time_s', float('nan')):.1f}s)"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running_epochs.pop(trial.trial_id, None)
        if TRIAL_ERROR_KEY in (trial.last_result or {}):
            self.errored += 1  # said when its error was reported
            return
        self.finished += 1
        epochs = (trial.last_result or {}).get("epoch", 0)
        if epochs < self.max_epochs:
            self.stopped_early += 1
            self._print(f"{self._name(trial)} stopped early by ASHA after {epochs} epoch(s)")
        else:
            self._print(f"{self._name(trial)} finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.errored += 1
        self.running_epochs.pop(trial.trial_id, None)
        self._print(f"{self._name(trial)} ERROR (details in {trial.path}/error.txt)")
