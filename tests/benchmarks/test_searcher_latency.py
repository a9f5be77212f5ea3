"""The searcher latency driver: every trial asked for and told, sizes in order, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._searcher_latency import measure_searcher_latency, synthetic_curve

# A small sweep: three random trials, then TPE with the constant liar over the rest.
SMALL = ("space=quick", "max_epochs=4", "tpe_startup_trials=3")


def test_a_small_study_is_asked_and_told_every_trial_at_growing_sizes(tmp_path: Path) -> None:
    latency = measure_searcher_latency(
        (20, 60), overrides=SMALL, in_flight=4, journal=tmp_path / "journal.log"
    )
    assert [size.study_size for size in latency.sizes] == [20, 60]
    # Each size covers the last 100 trials asked for before it, here all of them.
    assert [size.trials for size in latency.sizes] == [20, 60]
    assert [trial.study_size for trial in latency.trials] == list(range(60))
    assert all(trial.ask_s > 0 and trial.tell_s > 0 for trial in latency.trials)
    for size in latency.sizes:
        assert 0 < size.ask_p50_s <= size.ask_p95_s
        assert 0 < size.tell_p50_s <= size.tell_p95_s
        assert size.ask_tell_p50_s <= size.ask_tell_p95_s
    assert latency.series()[5] == (5, latency.trials[5].ask_s, latency.trials[5].tell_s)

    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    study = optuna.load_study(study_name="cxrtune", storage=storage)
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.COMPLETE] * 60
    import ray

    assert not ray.is_initialized()


def test_a_synthetic_curve_is_the_same_every_time_and_stops_at_a_rung() -> None:
    config = {"family": "baseline_cnn", "lr": 1e-3, "max_epochs": 10}
    curve = synthetic_curve(config)
    assert curve == synthetic_curve(dict(config))
    assert len(curve) in (2, 4, 8, 10)
    assert [result["epoch"] for result in curve] == list(range(1, len(curve) + 1))


def test_sizes_must_grow() -> None:
    with pytest.raises(ValueError, match="increasing"):
        measure_searcher_latency((60, 20))
