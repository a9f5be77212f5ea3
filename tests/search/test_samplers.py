"""The samplers the sweep wraps: what the windowed TPE sees of the study."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import optuna
import pytest

from cxrtune.search.samplers import JournalFile, RecentTrialsSampler


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


def test_a_journal_file_reads_on_from_its_last_log_and_forgets_the_other_offsets(
    tmp_path: Path,
) -> None:
    """Two storages on one file, as the driver and a resumed searcher's pickle may be."""
    path = str(tmp_path / "study.journal")
    driver = optuna.storages.JournalStorage(JournalFile(path))
    other = optuna.storages.JournalStorage(JournalFile(path))
    study = optuna.create_study(study_name="s", storage=driver)
    for value in range(30):
        study.tell(study.ask(), float(value))
    beside = optuna.load_study(study_name="s", storage=other)
    for value in range(30, 40):
        beside.tell(beside.ask(), float(value))
    for value in range(40, 45):
        study.tell(study.ask(), float(value))

    for storage in (driver, other):
        trials = optuna.load_study(study_name="s", storage=storage).get_trials(deepcopy=False)
        assert [trial.value for trial in trials] == [float(value) for value in range(45)]
        # Where the first log starts and where the last one read ends; Optuna's own
        # backend keeps one offset per log read (at least three per trial here).
        assert len(storage._backend._log_number_offset) <= 2  # type: ignore[attr-defined]
    # A new reader of the file reads it whole.
    fresh = optuna.storages.JournalStorage(JournalFile(path))
    assert len(optuna.load_study(study_name="s", storage=fresh).get_trials()) == 45
    assert pickle.loads(pickle.dumps(driver)).get_all_trials(0)[-1].value == 44.0
