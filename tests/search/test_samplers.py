"""The samplers the sweep wraps: what the windowed TPE sees of the study."""

from __future__ import annotations

import pickle
import warnings

import optuna
import pytest

from cxrtune.search.samplers import RecentTrialsSampler


def windowed_study(window: int) -> tuple[optuna.Study, RecentTrialsSampler]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=0, multivariate=True, group=True, constant_liar=True, n_startup_trials=3
        )
    sampler = RecentTrialsSampler(tpe, window)
    return optuna.create_study(sampler=sampler, directions=["maximize", "maximize"]), sampler


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    branch = trial.suggest_categorical("branch", ["a", "b"])
    y = trial.suggest_float(f"y_{branch}", 0.0, 1.0)
    return x + y, -x


def test_the_windowed_sampler_models_only_the_latest_trials_and_their_values() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, sampler = windowed_study(window=8)
    for _ in range(2):
        study.ask()  # outstanding while the others finish: running in the window
    study.optimize(objective, n_trials=30)
    assert sampler._recent is not None
    copied = sampler._recent.get_trials(deepcopy=False)
    assert 8 <= len(copied) <= 10
    finished = {t.number: t for t in study.get_trials(deepcopy=False)}
    latest = sorted(finished)[-len(copied) :]
    for number, copy in zip(latest, copied, strict=True):
        assert copy.params == finished[number].params
        assert copy.values == finished[number].values


def test_the_windowed_sampler_pickles_with_its_study() -> None:
    study, _ = windowed_study(window=8)
    study.optimize(objective, n_trials=12)
    again = pickle.loads(pickle.dumps(study))
    again.optimize(objective, n_trials=2)
    assert len(again.trials) == 14


def test_a_window_of_zero_trials_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        RecentTrialsSampler(optuna.samplers.RandomSampler(), 0)


def test_a_running_trial_in_the_window_holds_the_parameters_drawn_for_it_so_far() -> None:
    study, sampler = windowed_study(window=8)
    study.enqueue_trial({"branch": "b"})
    trial = study.ask()
    # Enqueued, as the sweep's first trial of each family: the sampler draws what follows.
    trial.suggest_categorical("branch", ["a", "b"])
    trial.suggest_float("x", 0.0, 1.0)
    assert sampler._recent is not None
    (copy,) = sampler._recent.get_trials(deepcopy=False)
    assert copy.state == optuna.trial.TrialState.RUNNING
    assert copy.params == trial.params == {"x": trial.params["x"], "branch": "b"}
