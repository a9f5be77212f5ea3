"""Item 8: Tune retries a crashed worker, never a trial that failed on its own.

No part of Ray is patched: the trial ends itself on its own failure
(``own_failures_end_the_trial``), and Tune's public ``FailureConfig`` retries the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cxrtune.trainables.engine import NonFiniteLossError
from cxrtune.trainables.failures import TRIAL_ERROR_KEY, own_failures_end_the_trial


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from cxrtune.search.sweep import start_ray

    start_ray(address=None)
    yield
    ray.shutdown()


def count_attempt_then_fail(config: dict[str, Any]) -> None:
    """A trial that records each attempt, then fails the way ``config["failure"]`` says."""
    from ray import tune

    attempts = Path(config["attempts_dir"]) / config["failure"]
    attempts.mkdir(exist_ok=True)
    (attempts / str(len(list(attempts.iterdir())))).touch()
    with own_failures_end_the_trial():
        if config["failure"] == "non_finite_loss":
            raise NonFiniteLossError("training loss is nan at epoch 1")
        if len(list(attempts.iterdir())) == 1:
            os._exit(1)  # the worker process dies: an infrastructure failure
        tune.report({"val_macro_auc": 0.5})


@pytest.mark.slow
def test_tune_retries_a_crashed_worker_but_not_a_non_finite_loss(
    tmp_path: Path, local_ray: None
) -> None:
    from ray import tune

    tuner = tune.Tuner(
        count_attempt_then_fail,
        param_space={
            "failure": tune.grid_search(["non_finite_loss", "worker_crash_once"]),
            "attempts_dir": str(tmp_path),
        },
        # A searched metric makes Tune check every result for it: the error result has none.
        tune_config=tune.TuneConfig(metric="val_macro_auc", mode="max"),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "results"),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0,
        ),
    )
    results = tuner.fit()

    assert len(list((tmp_path / "non_finite_loss").iterdir())) == 1
    assert len(list((tmp_path / "worker_crash_once").iterdir())) == 2
    outcome = {results[index].config["failure"]: results[index] for index in range(2)}
    assert outcome["non_finite_loss"].error is None
    assert "training loss is nan" in outcome["non_finite_loss"].metrics[TRIAL_ERROR_KEY]
    assert outcome["worker_crash_once"].error is None
    assert outcome["worker_crash_once"].metrics["val_macro_auc"] == 0.5
