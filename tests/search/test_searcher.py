"""cxrtune's searcher: ask/tell round trips, best-epoch values, stopped trials (issue item 2)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import optuna
import pytest

from cxrtune.analysis.experiment import OPTUNA_JOURNAL, OPTUNA_STUDY_NAME
from cxrtune.search.config import SweepConfigError, load_sweep_config
from cxrtune.search.searcher import (
    BEST_EPOCH_ATTR,
    RAY_TRIAL_ID_ATTR,
    STOPPED_EARLY_ATTR,
    StudySearcher,
    best_epoch,
)
from cxrtune.search.tuner import build_searcher, journal_storage

State = optuna.trial.TrialState
SEARCH_DIR = Path(__file__).resolve().parents[2] / "search"


def searcher_for(tmp_path: Path, *overrides: str) -> StudySearcher:
    config = load_sweep_config(
        None, ["space=quick", "families=[baseline_cnn, regularized_cnn]", *overrides]
    )
    return build_searcher(config, "none", tmp_path / OPTUNA_JOURNAL)


def journal_trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = journal_storage(tmp_path / OPTUNA_JOURNAL)
    return optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=storage).trials


def epoch(number: int, recall: float, auc: float) -> dict[str, float]:
    return {"epoch": number, "val_covid_recall_at_spec": recall, "val_macro_auc": auc}


def run(searcher: StudySearcher, trial_id: str, epochs: list[dict[str, float]]) -> None:
    """As Tune does: every epoch to on_trial_result but the last, which ends the trial."""
    for result in epochs[:-1]:
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=epochs[-1])


def test_an_asked_trial_is_running_in_the_journal_and_its_config_holds_params_and_fixed_values(
    tmp_path: Path,
) -> None:
    searcher = searcher_for(tmp_path, "max_epochs=3")
    config = searcher.suggest("ray-a")
    assert config is not None
    (trial,) = [t for t in journal_trials(tmp_path) if t.state == State.RUNNING]
    assert trial.user_attrs[RAY_TRIAL_ID_ATTR] == "ray-a"
    assert {name: config[name] for name in trial.params} == trial.params
    assert config["family"] == "baseline_cnn"  # each family first, as enqueued
    assert config["max_epochs"] == 3 and config["weights"] == "none"


def test_a_finished_trial_is_told_its_values_at_its_best_validation_epoch(tmp_path: Path) -> None:
    """The epoch the leaderboard ranks: best by the scheduler metric, val_macro_auc."""
    searcher = searcher_for(tmp_path, "max_epochs=3")
    searcher.suggest("ray-a")
    run(searcher, "ray-a", [epoch(1, 0.2, 0.70), epoch(2, 0.4, 0.90), epoch(3, 0.6, 0.80)])
    (trial,) = journal_trials(tmp_path)[:1]
    assert trial.state == State.COMPLETE
    assert trial.values == [0.4, 0.90]
    assert trial.user_attrs[BEST_EPOCH_ATTR] == 2
    assert STOPPED_EARLY_ATTR not in trial.user_attrs


def test_the_best_epoch_prefers_the_later_of_equal_epochs_and_skips_nan() -> None:
    """As the leaderboard chooses: Ray keeps the latest checkpoint of equal scores."""
    results = [
        {"epoch": 1, "val_loss": float("nan")},
        {"epoch": 2, "val_loss": 0.5},
        {"epoch": 3, "val_loss": 0.5},
        {"epoch": 4, "val_loss": 0.7},
    ]
    assert best_epoch(results, "val_loss")["epoch"] == 3
    assert best_epoch([{"epoch": 1, "val_loss": float("nan")}], "val_loss")["epoch"] == 1


@pytest.mark.parametrize(
    ("policy", "state"),
    [("complete", State.COMPLETE), ("pruned", State.PRUNED), ("omit", State.FAIL)],
)
def test_a_trial_asha_stopped_is_told_as_the_sweep_says(
    tmp_path: Path, policy: str, state: optuna.trial.TrialState
) -> None:
    searcher = searcher_for(tmp_path, "max_epochs=4", f"stopped_trials={policy}")
    searcher.suggest("ray-a")
    run(searcher, "ray-a", [epoch(1, 0.3, 0.6), epoch(2, 0.5, 0.7)])  # stopped after 2 of 4
    trial = journal_trials(tmp_path)[0]
    assert trial.state == state
    assert trial.user_attrs[STOPPED_EARLY_ATTR] is True
    if policy == "complete":
        assert trial.values == [0.5, 0.7]
    else:
        assert trial.values is None


def test_a_pruned_single_objective_trial_keeps_its_curve_as_intermediate_values(
    tmp_path: Path,
) -> None:
    searcher = searcher_for(
        tmp_path, "max_epochs=4", "stopped_trials=pruned", "objectives=[val_macro_auc]"
    )
    searcher.suggest("ray-a")
    run(searcher, "ray-a", [epoch(1, 0.3, 0.6), epoch(2, 0.5, 0.7)])
    trial = journal_trials(tmp_path)[0]
    assert trial.state == State.PRUNED
    assert trial.intermediate_values == {1: 0.6, 2: 0.7}


def test_an_errored_trial_fails_and_a_second_complete_is_ignored(tmp_path: Path) -> None:
    searcher = searcher_for(tmp_path)
    searcher.suggest("ray-a")
    searcher.on_trial_complete("ray-a", error=True)
    searcher.on_trial_complete("ray-a", result=epoch(1, 0.5, 0.5))
    assert journal_trials(tmp_path)[0].state == State.FAIL


def test_a_restored_searcher_tells_a_running_trial_its_best_epoch(tmp_path: Path) -> None:
    """Resume after a driver kill: the epochs seen before the snapshot still count."""
    searcher = searcher_for(tmp_path, "max_epochs=3")
    built = pickle.dumps(searcher)
    searcher.suggest("ray-a")
    searcher.on_trial_result("ray-a", epoch(1, 0.9, 0.95))
    searcher.save(str(tmp_path / "state.pkl"))

    restored = pickle.loads(built)
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_result("ray-a", epoch(2, 0.1, 0.5))
    restored.on_trial_result("ray-a", epoch(3, 0.2, 0.6))
    restored.on_trial_complete("ray-a", result=epoch(3, 0.2, 0.6))
    assert journal_trials(tmp_path)[0].values == [0.9, 0.95]


def test_tpe_group_without_multivariate_is_refused_naming_the_key() -> None:
    with pytest.raises(SweepConfigError, match="tpe_group"):
        load_sweep_config(None, ["tpe_multivariate=false", "tpe_group=true"])


def test_an_unknown_stopped_trials_policy_is_refused_naming_the_key() -> None:
    with pytest.raises(SweepConfigError, match="stopped_trials"):
        load_sweep_config(None, ["stopped_trials=forget"])


def test_the_search_package_uses_no_private_optuna_or_ray_searcher_state() -> None:
    """Issue item 2: public APIs only."""
    pattern = re.compile(r"_ot_|_completed_trials|optuna\.Trial\(")
    offending = [
        f"{path.name}:{number}"
        for path in sorted(SEARCH_DIR.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offending == []


def test_the_result_that_ends_a_trial_counts_though_only_on_trial_complete_sees_it(
    tmp_path: Path,
) -> None:
    """Tune passes the last (or ASHA-stopping) result to on_trial_complete alone."""
    searcher = searcher_for(tmp_path, "max_epochs=2")
    searcher.suggest("ray-a")
    searcher.on_trial_result("ray-a", epoch(1, 0.2, 0.6))
    searcher.on_trial_complete("ray-a", result=epoch(2, 0.3, 0.7))
    trial = journal_trials(tmp_path)[0]
    assert trial.values == [0.3, 0.7]
    assert STOPPED_EARLY_ATTR not in trial.user_attrs
