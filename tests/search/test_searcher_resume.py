"""The searcher restored after its driver died agrees with the Optuna journal."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import optuna
import pytest

from cxrtune.analysis.experiment import OPTUNA_JOURNAL, OPTUNA_STUDY_NAME
from cxrtune.search.config import load_sweep_config
from cxrtune.search.tuner import RAY_TRIAL_ID_ATTR, build_searcher, journal_storage

RESULT = {"val_covid_recall_at_spec": 0.5, "val_macro_auc": 0.75}


def journal_trials(journal: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=journal_storage(journal))
    return study.get_trials(deepcopy=False)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_a_restored_searcher_reuses_trials_asked_after_the_snapshot_and_tells_none_twice(
    tmp_path: Path, sampler: str
) -> None:
    config = load_sweep_config(
        None, ["families=[baseline_cnn, regularized_cnn]", "space=quick", f"sampler={sampler}"]
    )
    journal = tmp_path / OPTUNA_JOURNAL
    searcher = build_searcher(config, "none", journal)
    as_started = pickle.dumps(searcher)  # what Ray keeps in tuner.pkl
    searcher.suggest("ray-a")
    searcher.suggest("ray-b")
    snapshot = tmp_path / "searcher-state.pkl"
    searcher.save(str(snapshot))  # Ray's last snapshot before the driver dies
    orphan = searcher.suggest("ray-c")  # asked for, then the driver died before a snapshot
    searcher.on_trial_complete("ray-a", result=RESULT)  # told after the snapshot

    restored = pickle.loads(as_started)
    restored.restore(str(snapshot))
    # Ray resumes ray-a from its checkpoint and completes it again; ray-c is unknown to it.
    restored.on_trial_complete("ray-a", result={**RESULT, "val_macro_auc": 0.9})
    assert restored.suggest("ray-d") == orphan
    restored.on_trial_complete("ray-b", result=RESULT)
    restored.on_trial_complete("ray-d", result=RESULT)
    fresh = restored.suggest("ray-e")

    trials = journal_trials(journal)
    assert [trial.user_attrs[RAY_TRIAL_ID_ATTR] for trial in trials] == [
        "ray-a",
        "ray-b",
        "ray-d",
        "ray-e",
    ]
    assert trials[0].values == [0.5, 0.75]  # told once, before the driver died
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * 3 + ["RUNNING"]
    assert fresh is not None and fresh != orphan


def test_a_trial_asked_for_but_not_yet_sampled_when_the_driver_died_is_closed_not_reused(
    tmp_path: Path,
) -> None:
    config = load_sweep_config(None, ["families=[baseline_cnn, regularized_cnn]", "space=quick"])
    journal = tmp_path / OPTUNA_JOURNAL
    searcher = build_searcher(config, "none", journal)
    as_started = pickle.dumps(searcher)
    searcher.suggest("ray-a")
    snapshot = tmp_path / "searcher-state.pkl"
    searcher.save(str(snapshot))
    searcher.study.ask()  # killed after the ask, before the space sampled a parameter

    restored = pickle.loads(as_started)
    restored.restore(str(snapshot))
    config_b = restored.suggest("ray-b")

    assert config_b is not None and config_b["family"] in ("baseline_cnn", "regularized_cnn")
    trials = journal_trials(journal)
    assert [trial.state.name for trial in trials] == ["RUNNING", "FAIL", "RUNNING"]
    assert trials[2].user_attrs[RAY_TRIAL_ID_ATTR] == "ray-b"


@pytest.mark.parametrize("objectives", ["[val_macro_auc]", "[val_covid_recall, val_macro_auc]"])
def test_a_trial_that_ended_on_its_own_failure_is_a_failed_optuna_trial(
    tmp_path: Path, objectives: str
) -> None:
    """Item 8: its last result holds its error and no objective; Optuna records a failure."""
    from cxrtune.trainables.failures import TRIAL_ERROR_KEY

    config = load_sweep_config(
        None, ["families=[baseline_cnn]", "space=quick", f"objectives={objectives}"]
    )
    journal = tmp_path / OPTUNA_JOURNAL
    searcher = build_searcher(config, "none", journal)
    searcher.suggest("ray-a")
    searcher.on_trial_complete("ray-a", result={TRIAL_ERROR_KEY: "NonFiniteLossError: nan"})
    [trial] = journal_trials(journal)
    assert trial.state == optuna.trial.TrialState.FAIL


def test_the_nsga2_sampler_survives_a_pickle_round_trip_and_keeps_sampling() -> None:
    """Optuna 5.1's NSGA-II sampler holds a thread lock; Ray pickles the searcher with it."""
    from cxrtune.search.samplers import NSGAIISampler

    sampler = pickle.loads(pickle.dumps(NSGAIISampler(seed=0, population_size=4)))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(lambda trial: (trial.suggest_float("x", 0, 1), 1.0), n_trials=10)
    assert len(study.trials) == 10  # past the first generation: the sampler's own path ran
    assert pickle.loads(pickle.dumps(study.sampler)) is not None
    # Each lock comes back as a fresh lock of its own kind, re-entrant or not.
    sampler.reentrant = threading.RLock()
    restored = pickle.loads(pickle.dumps(sampler))
    with restored.reentrant, restored.reentrant:
        pass
