"""Item 8: which failures end a trial for good, and how (no Ray instance needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError

from cxrtune.trainables.config import ConfigError
from cxrtune.trainables.engine import NonFiniteLossError
from cxrtune.trainables.failures import (
    TRIAL_ERROR_KEY,
    is_infrastructure_failure,
    own_failures_end_the_trial,
)
from cxrtune.trainables.models import WeightsUnavailableError


def raised_by_a_worker(cause: BaseException) -> RayTaskError:
    """What a trial sees when code it ran on a Ray worker (Ray Train, a task) raised ``cause``."""
    return RayTaskError("RayTrainWorker.run", "Traceback (most recent call last): ...", cause)


def worker_lost_inside_the_trial() -> RuntimeError:
    """A trial whose own workers (Ray Train, for instance) lost their node."""
    failure = RuntimeError("training failed")
    failure.__cause__ = NodeDiedError("node 127.0.0.1 died")
    return failure


def a_data_parallel_worker_died() -> BaseException:
    """What a data-parallel trial's Ray Train run ends with when one of its workers is killed."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    return WorkerGroupError("[Rank 1 Error Snippet]: ...", {1: died})


OWN_FAILURES = [
    NonFiniteLossError("loss became nan at epoch 2"),
    ConfigError("unknown key 'drop_out'"),
    WeightsUnavailableError("VGG16 weights vgg.pt do not fit the VGG16 trunk"),
    ValueError("a plain bug"),
    raised_by_a_worker(NonFiniteLossError("loss became nan on rank 1")),
]
INFRASTRUCTURE_FAILURES = [
    ActorDiedError(),
    torch.cuda.OutOfMemoryError("CUDA out of memory"),
    ConnectionError("storage connection reset"),
    worker_lost_inside_the_trial(),
    raised_by_a_worker(ActorDiedError()),
    a_data_parallel_worker_died(),
]


@pytest.mark.parametrize("error", OWN_FAILURES, ids=repr)
def test_a_failure_of_the_trials_own_is_not_infrastructure(error: BaseException) -> None:
    assert not is_infrastructure_failure(error)


@pytest.mark.parametrize("error", INFRASTRUCTURE_FAILURES, ids=repr)
def test_failures_of_the_infrastructure_are_recognised(error: BaseException) -> None:
    assert is_infrastructure_failure(error)


@pytest.mark.parametrize("error", OWN_FAILURES, ids=repr)
def test_an_own_failure_ends_the_trial_with_a_result_carrying_the_error(
    error: BaseException,
) -> None:
    reports: list[dict[str, Any]] = []
    with own_failures_end_the_trial(reports.append):
        raise error
    assert reports == [{TRIAL_ERROR_KEY: f"{type(error).__name__}: {error}"}]


@pytest.mark.parametrize("error", INFRASTRUCTURE_FAILURES, ids=repr)
def test_an_infrastructure_failure_propagates_for_tune_to_retry(error: BaseException) -> None:
    reports: list[dict[str, Any]] = []
    with pytest.raises(type(error)), own_failures_end_the_trial(reports.append):
        raise error
    assert reports == []


def test_tunes_stop_passes_through_untouched() -> None:
    reports: list[dict[str, Any]] = []
    with pytest.raises(SystemExit), own_failures_end_the_trial(reports.append):
        raise SystemExit  # how Tune stops a function trainable
    assert reports == []
