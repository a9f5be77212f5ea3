"""A compact progress display: one line per trial epoch, start, stop and error."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from cxrtune.trainables.failures import TRIAL_ERROR_KEY


class SweepProgress(Callback):
    """Prints what each trial is doing, with a running count of finished trials."""

    def __init__(self, num_samples: int, max_epochs: int):
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self.started = time.monotonic()
        self.finished = 0
        self.errored = 0
        self.stopped_early = 0
        self.counted_earlier_trials = False

    def setup(self, *args: Any, **info: Any) -> None:
        self.started = time.monotonic()  # a resumed sweep is timed from its resumption

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.counted_earlier_trials:
            # A resumed sweep starts with the trials that ended before its driver died.
            ended = [trial for trial in trials if trial.status in ("TERMINATED", "ERROR")]
            self.errored = sum(
                trial.status == "ERROR" or TRIAL_ERROR_KEY in (trial.last_result or {})
                for trial in ended
            )
            self.finished = len(ended) - self.errored
            self.counted_earlier_trials = True

    def _print(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        done = self.finished + self.errored
        # sys.stdout is looked up on each call: the Tuner pickles its callbacks, and a
        # stream held as an attribute would not pickle.
        line = f"[{elapsed:6.0f}s {done:3d}/{self.num_samples}] {message}"
        print(line, file=sys.stdout, flush=True)

    @staticmethod
    def _name(trial: Any) -> str:
        return f"{trial.trial_id} {trial.config.get('family', '?'):<15}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"{self._name(trial)} started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if TRIAL_ERROR_KEY in result:
            self._print(f"{self._name(trial)} ERROR, not retried: {result[TRIAL_ERROR_KEY]}")
            return
        self._print(
            f"{self._name(trial)} epoch {result.get('epoch', '?')}/{self.max_epochs}"
            f"  val_covid_recall {result.get('val_covid_recall', float('nan')):.3f}"
            f"  val_macro_auc {result.get('val_macro_auc', float('nan')):.3f}"
            f"  ({result.get('epoch_time_s', float('nan')):.1f}s)"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
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
        self._print(f"{self._name(trial)} ERROR (details in {trial.path}/error.txt)")
