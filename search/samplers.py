"""Optuna's parts as the sweep needs them: picklable, and light on studies of thousands.

Ray pickles the searcher, and with it the study's sampler and storage, into the
experiment state when a sweep starts and at each snapshot. Optuna 5.1's NSGA-II sampler
holds a thread lock, which does not pickle; ``NSGAIISampler`` here leaves its locks out
of the pickle and makes fresh ones when it is read back.

``RecentTrialsSampler`` bounds the cost of an ask on a study of thousands of trials
(the sweep file's ``tpe_window_trials``): the wrapped sampler sees only the latest
trials. ``JournalFile`` is Optuna's journal file, less an index that grows with it.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

__all__ = ["JournalFile", "NSGAIISampler", "RecentTrialsSampler"]

# A lock in a pickle: the name of the kind, made afresh on the way back.
_LOCKS = {type(threading.Lock()): "threading.Lock", type(threading.RLock()): "threading.RLock"}
_NEW_LOCK = {"threading.Lock": threading.Lock, "threading.RLock": threading.RLock}
_MARK = "<cxrtune: made afresh on unpickling> "


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable whatever locks its version holds."""

    def __getstate__(self) -> dict[str, Any]:
        return {
            name: _MARK + _LOCKS[type(value)] if type(value) in _LOCKS else value
            for name, value in vars(self).items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {
                name: (
                    _NEW_LOCK[value.removeprefix(_MARK)]()
                    if isinstance(value, str) and value.startswith(_MARK)
                    else value
                )
                for name, value in state.items()
            }
        )


class RecentTrialsSampler(optuna.samplers.BaseSampler):
    """Runs ``sampler`` on the study's most recent ``window`` trials only, not on all of them.

    TPE reads every trial of the study at every ask, so its ask grows with the study
    (about 0.1 s at 1,000 trials, 0.5 s at 10,000). This sampler keeps a copy of the
    latest trials in an in-memory study of its own, mirrored at each ask and tell, and
    hands the wrapped sampler that copy: an ask costs what it costs on a study of
    ``window`` trials, however large the study grows. The copy holds between
    ``window`` and ``window * 5 // 4`` trials (those asked for last, finished or
    running), since it is rebuilt from its latest ``window`` trials once a quarter
    more have been added: trials cannot be removed from an Optuna study.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.sampler = sampler
        self.window = window
        self._recent: optuna.Study | None = None
        self._recent_storage = optuna.storages.InMemoryStorage()
        self._recent_trial_ids: dict[int, int] = {}  # study's trial number -> copy's trial id

    def _recent_study(self, study: optuna.Study) -> optuna.Study:
        if self._recent is None:
            self._recent = self._new_recent_study(study.directions)
        return self._recent

    def _new_recent_study(self, directions: list[optuna.study.StudyDirection]) -> optuna.Study:
        self._recent_storage = optuna.storages.InMemoryStorage()
        return optuna.create_study(
            storage=self._recent_storage, sampler=self.sampler, directions=directions
        )

    def _recent_trial(self, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """The copy of ``trial``, holding every parameter ``trial`` holds so far.

        A running trial's parameters (an enqueued one's, or one drawn independently)
        are what TPE's constant liar counts against.
        """
        trial_id = self._recent_trial_ids[trial.number]
        self._copy_params(trial_id, trial.params, trial.distributions)
        return self._recent_storage.get_trial(trial_id)

    def _copy_params(
        self,
        trial_id: int,
        params: dict[str, Any],
        distributions: dict[str, optuna.distributions.BaseDistribution],
    ) -> None:
        copied = self._recent_storage.get_trial_params(trial_id)
        for name in params.keys() - copied.keys():
            distribution = distributions[name]
            self._recent_storage.set_trial_param(
                trial_id, name, distribution.to_internal_repr(params[name]), distribution
            )

    def _slide(self) -> None:
        """Start the copy afresh from its latest ``window`` trials."""
        assert self._recent is not None
        kept = sorted(self._recent_trial_ids.items())[-self.window :]
        kept_trials = [self._recent_storage.get_trial(trial_id) for _, trial_id in kept]
        self._recent = self._new_recent_study(self._recent.directions)
        study_id = self._recent_storage.get_study_id_from_name(self._recent.study_name)
        self._recent_trial_ids = {
            number: self._recent_storage.create_new_trial(study_id, template_trial=trial)
            for (number, _), trial in zip(kept, kept_trials, strict=True)
        }

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        recent = self._recent_study(study)
        if len(self._recent_trial_ids) >= self.window + max(1, self.window // 4):
            self._slide()
            recent = self._recent_study(study)
        study_id = self._recent_storage.get_study_id_from_name(recent.study_name)
        # Running, its parameters not yet drawn: the wrapped sampler records in the copy
        # what it draws for it, as it would in the study (TPE's constant liar reads them).
        self._recent_trial_ids[trial.number] = self._recent_storage.create_new_trial(study_id)
        self.sampler.before_trial(recent, self._recent_trial(trial))

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self.sampler.infer_relative_search_space(
            self._recent_study(study), self._recent_trial(trial)
        )

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(
            self._recent_study(study), self._recent_trial(trial), search_space
        )

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        value = self.sampler.sample_independent(
            self._recent_study(study), self._recent_trial(trial), param_name, param_distribution
        )
        self._copy_params(
            self._recent_trial_ids[trial.number],
            {param_name: value},
            {param_name: param_distribution},
        )
        return value

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        recent = self._recent_study(study)
        trial_id = self._recent_trial_ids.get(trial.number)
        if trial_id is None:
            return  # asked for before the copy's latest trials; slid out of it already
        # The copy learns the parameters, values and intermediate values the study holds.
        self._copy_params(trial_id, trial.params, trial.distributions)
        for step, intermediate in trial.intermediate_values.items():
            self._recent_storage.set_trial_intermediate_value(trial_id, step, intermediate)
        self.sampler.after_trial(recent, self._recent_storage.get_trial(trial_id), state, values)
        self._recent_storage.set_trial_state_values(trial_id, state, values)


class JournalFile(JournalFileBackend):
    """Optuna's journal file, remembering where only the last log it read ends.

    ``JournalFileBackend`` keeps the byte offset of every log it has read, for as
    long as the driver runs: about 1.2 KB per trial of the sweep. ``JournalStorage``
    reads on from the last log it read, and a new reader from the start, so those
    two offsets are all it needs. Optuna offers no public way to trim the others.
    """

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        yield from super().read_logs(log_number_from)
        offsets = self._log_number_offset
        if len(offsets) > 2:
            last = max(offsets)
            self._log_number_offset = {0: offsets[0], last: offsets[last]}
