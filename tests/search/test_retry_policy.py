from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError

from cxrtune.search.retry_policy import is_retryable, retry_only_retryable_errors
from cxrtune.trainables.config import ConfigError
from cxrtune.trainables.engine import NonFiniteLossError


def raised_by_trial(cause: BaseException) -> RayTaskError:
    """What the Tune controller receives when the trial's code raised ``cause``."""
    return RayTaskError("ImplicitFunc.train", "Traceback (most recent call last): ...", cause)


@pytest.mark.parametrize(
    "cause",
    [
        NonFiniteLossError("loss became nan at epoch 2"),
        ConfigError("unknown key 'drop_out'"),
        ValueError("a plain bug"),
    ],
)
def test_an_error_of_the_trials_own_is_not_retried(cause: BaseException) -> None:
    assert not is_retryable(raised_by_trial(cause))


def worker_lost_inside_the_trial() -> RayTaskError:
    """A trial whose own workers (Ray Train, for instance) lost their node."""
    failure = RuntimeError("training failed")
    failure.__cause__ = NodeDiedError("node 127.0.0.1 died")
    return raised_by_trial(failure)


@pytest.mark.parametrize(
    "error",
    [
        ActorDiedError(),  # the trial's worker process or node died
        raised_by_trial(torch.cuda.OutOfMemoryError("CUDA out of memory")),
        raised_by_trial(ConnectionError("storage connection reset")),
        worker_lost_inside_the_trial(),
    ],
)
def test_failures_of_the_infrastructure_are_retried(error: BaseException) -> None:
    assert is_retryable(error)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from cxrtune.search.sweep import start_ray

    start_ray(address=None)
    yield
    ray.shutdown()


def count_attempt_then_fail(config: dict[str, Any]) -> None:
    """A trial that records each attempt, then fails the way ``config["failure"]`` says."""
    attempts = Path(config["attempts_dir"]) / config["failure"]
    attempts.mkdir(exist_ok=True)
    (attempts / str(len(list(attempts.iterdir())))).touch()
    if config["failure"] == "non_finite_loss":
        raise NonFiniteLossError("training loss is nan at epoch 1")
    if len(list(attempts.iterdir())) == 1:
        os._exit(1)  # the worker process dies: an infrastructure failure


@pytest.mark.slow
def test_tune_retries_a_crashed_worker_but_not_a_non_finite_loss(
    tmp_path: Path, local_ray: None
) -> None:
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._process_trial_failure
    tuner = tune.Tuner(
        count_attempt_then_fail,
        param_space={
            "failure": tune.grid_search(["non_finite_loss", "worker_crash_once"]),
            "attempts_dir": str(tmp_path),
        },
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "results"),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0,
        ),
    )
    with retry_only_retryable_errors():
        results = tuner.fit()

    assert TuneController._process_trial_failure is original
    assert len(list((tmp_path / "non_finite_loss").iterdir())) == 1
    assert len(list((tmp_path / "worker_crash_once").iterdir())) == 2
    outcome = {results[index].config["failure"]: results[index].error for index in range(2)}
    assert isinstance(outcome["non_finite_loss"], Exception)
    assert "training loss is nan" in str(outcome["non_finite_loss"])
    assert outcome["worker_crash_once"] is None
