"""cxrtune's searcher: an Optuna study driven by ``ask()`` and ``tell()``, as a Tune ``Searcher``.

Public APIs only, of both libraries: Ray calls ``suggest`` for each new trial,
``on_trial_result`` every epoch and ``on_trial_complete`` once; the searcher asks
the study for a trial, runs the sweep's define-by-run space on it, and tells the
study the trial's values at its best-validation epoch (best by the scheduler's
metric, earlier epochs winning ties), the epoch the leaderboard ranks.

A trial ASHA stopped before ``max_epochs`` is told as ``stopped_trials`` says:

- ``complete``: COMPLETE with the values it reached, as if they were final;
- ``pruned``: PRUNED. A single-objective study gets the objective of every epoch
  as intermediate values (TPE ranks pruned trials by their last one); Optuna
  keeps no intermediate values for several objectives, so there TPE counts a
  pruned trial among the worse ones;
- ``omit``: FAIL, with the user attribute ``stopped_early``: out of the model.

The study lives in an Optuna journal file (or in memory). Ray pickles the
searcher into its experiment state when the sweep starts and snapshots its
state with ``save`` every few seconds; ``restore`` takes the study in the
journal as the truth, since the journal is written at once and may be ahead of
the snapshot (see ``StudySearcher.restore``).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from cxrtune.search.config import STOPPED_TRIAL_POLICIES
from cxrtune.trainables.failures import TRIAL_ERROR_KEY
from cxrtune.trainables.metrics import metric_mode

if TYPE_CHECKING:
    import optuna

__all__ = ["RAY_TRIAL_ID_ATTR", "StudySearcher", "best_epoch"]

# The Optuna user attribute holding the Ray trial id, the name the trial folders,
# the leaderboard and MLflow use.
RAY_TRIAL_ID_ATTR = "ray_trial_id"
# The user attributes a told trial carries: its best-validation epoch, and whether
# ASHA stopped it before max_epochs.
BEST_EPOCH_ATTR = "best_epoch"
STOPPED_EARLY_ATTR = "stopped_early"


def best_epoch(results: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The result with the best ``metric``; later results win ties, NaN never wins.

    Later wins ties as in the leaderboard's choice, since Ray keeps the latest checkpoint of
    equal scores. With no finite ``metric`` at all, the last result.
    """
    sign = -1.0 if metric_mode(metric) == "min" else 1.0
    best: dict[str, Any] | None = None
    for result in results:
        value = result.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best is None or sign * value >= sign * best[metric]:
            best = result
    return best if best is not None else results[-1]


class StudySearcher(Searcher):
    """Asks an Optuna study for each Ray trial's config and tells it each trial's values.

    ``space`` is the define-by-run function: called with an ``optuna.Trial`` (or an
    ``optuna.trial.FixedTrial``), it samples into it and returns the values it holds
    fixed; the trial's config is both, and must hold ``max_epochs``. ``storage`` is
    the study's storage, through which trials are labelled.
    """

    def __init__(
        self,
        *,
        space: Callable[[Any], dict[str, Any]],
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        objectives: Sequence[str],
        best_epoch_metric: str,
        stopped_trials: str = "complete",
    ) -> None:
        if stopped_trials not in STOPPED_TRIAL_POLICIES:
            raise ValueError(
                f"stopped_trials must be one of {list(STOPPED_TRIAL_POLICIES)}, "
                f"got {stopped_trials!r}"
            )
        super().__init__(metric=None, mode=None)
        self.space = space
        self.study = study
        self.storage = storage
        self.objectives = tuple(objectives)
        self.best_epoch_metric = best_epoch_metric
        self.stopped_trials = stopped_trials
        self.trial_numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.max_epochs: dict[str, int] = {}  # Ray trial id -> its config's max_epochs
        self.results: dict[str, list[dict[str, Any]]] = {}  # Ray trial id -> epoch results
        self.told: set[str] = set()  # Ray trial ids whose Optuna trial is finished
        self.unclaimed: list[int] = []  # asked for by a Ray trial the snapshot lacks

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        # The objectives are the searcher's own; the Tuner names no metric.
        return metric is None and mode is None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        import optuna

        while self.unclaimed:
            number = self.unclaimed.pop(0)
            (frozen,) = [t for t in self.study.get_trials(deepcopy=False) if t.number == number]
            trial: Any = optuna.trial.FixedTrial(frozen.params, number)
            try:
                held = self.space(trial)
                break
            except ValueError:
                # A parameter is missing: the driver was killed while sampling them. The
                # trial never ran, so it is closed, and the next one handed over or asked.
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        else:
            trial = self.study.ask()
            number = trial.number
            held = self.space(trial)
        config = {**trial.params, **held}
        self._set_user_attr(number, RAY_TRIAL_ID_ATTR, trial_id)
        self.trial_numbers[trial_id] = number
        self.max_epochs[trial_id] = int(config["max_epochs"])
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        kept = ("epoch", "training_iteration", self.best_epoch_metric, *self.objectives)
        self.results.setdefault(trial_id, []).append(
            {key: result[key] for key in kept if key in result}
        )

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        import optuna

        if trial_id in self.told or trial_id not in self.trial_numbers:
            return  # told before the driver died; Ray reran its last epochs after the snapshot
        number = self.trial_numbers[trial_id]
        self.told.add(trial_id)
        results = self.results.pop(trial_id, [])
        # Tune hands the result that ends a trial (its last epoch, or the one ASHA
        # stopped it at) to on_trial_complete only.
        if result and (not results or self._epoch(result) != self._epoch(results[-1])):
            results.append(result)
        # A trial that failed on its own ended itself with its error: a failed Optuna
        # trial, whatever epochs it reported before.
        error = error or any(TRIAL_ERROR_KEY in r for r in results)
        results = [r for r in results if all(name in r for name in self.objectives)]
        if error or not results:
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            return
        best = best_epoch(results, self.best_epoch_metric)
        epochs = self._epoch(results[-1]) or len(results)
        if "epoch" in best:
            self._set_user_attr(number, BEST_EPOCH_ATTR, int(best["epoch"]))
        values = [float(best[name]) for name in self.objectives]
        stopped = epochs < self.max_epochs.get(trial_id, epochs)
        if stopped:
            self._set_user_attr(number, STOPPED_EARLY_ATTR, True)
        if not stopped or self.stopped_trials == "complete":
            self.study.tell(number, values)
        elif self.stopped_trials == "pruned":
            if len(self.objectives) == 1:
                self._report_intermediate_values(number, results)
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__.copy(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Load a snapshot, then take the journal as the truth where it is ahead.

        An Optuna trial asked for by a Ray trial the snapshot lacks is handed to the
        next new Ray trial (same parameters, nothing sampled twice); a trial told
        after the snapshot is not told again. An Optuna trial asked for and finished
        after the snapshot (within seconds: a trial erroring at once) stays in the
        journal, and Ray runs a trial in its place.
        """
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        import optuna

        # The study, unpickled from the snapshot, has read the whole journal (an
        # in-memory study is the snapshot's own, and nothing is ahead of it).
        asked_after_snapshot = False
        self.unclaimed = []
        for frozen in self.study.get_trials(deepcopy=False):
            ray_trial_id = frozen.user_attrs.get(RAY_TRIAL_ID_ATTR)
            if isinstance(ray_trial_id, str) and ray_trial_id in self.trial_numbers:
                if frozen.state.is_finished():
                    self.told.add(ray_trial_id)
            elif frozen.state != optuna.trial.TrialState.WAITING:
                asked_after_snapshot = True
                if frozen.state == optuna.trial.TrialState.RUNNING:
                    self.unclaimed.append(frozen.number)
        if asked_after_snapshot:
            # The sampler's random state is the snapshot's: left as it is, it would draw
            # again the parameters it drew for the trials asked for since. The sweep stays
            # seeded up to the resume, not after it.
            self.study.sampler.reseed_rng()

    @staticmethod
    def _epoch(result: dict[str, Any]) -> int | None:
        epoch = result.get("epoch", result.get("training_iteration"))
        return None if epoch is None else int(epoch)

    def _storage_trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _set_user_attr(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self._storage_trial_id(number), key, value)

    def _report_intermediate_values(self, number: int, results: list[dict[str, Any]]) -> None:
        trial_id = self._storage_trial_id(number)
        for step, result in enumerate(results, start=1):
            value = float(result[self.objectives[0]])
            self.storage.set_trial_intermediate_value(
                trial_id, int(result.get("epoch", step)), value
            )
