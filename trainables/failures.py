"""Which failures end a trial for good, and how such a trial ends.

A trial that fails on its own (a non-finite loss, a bad config, pretrained
weights that do not fit, a bug) would fail the same way again from the same
checkpoint, so retrying it wastes the retries and, at worst, misleads. Such a
failure ends the trial from inside the trainable: ``own_failures_end_the_trial``
reports one last result carrying the error under ``TRIAL_ERROR_KEY`` and lets
the trainable return, so Tune records a finished trial and never retries it.
Everything else (a dead worker or node, an out-of-memory kill, a lost object,
a storage hiccup) propagates, and Tune's public ``FailureConfig(max_failures)``
retries the trial from its last checkpoint.

The leaderboard lists a trial whose results carry ``TRIAL_ERROR_KEY`` apart,
with its error, as it does one Tune marked errored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["TRIAL_ERROR_KEY", "is_infrastructure_failure", "own_failures_end_the_trial"]

logger = logging.getLogger(__name__)

# The result key of the last result of a trial that failed on its own: the error, as text.
TRIAL_ERROR_KEY = "trial_error"


def _infrastructure_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as errors

    return (
        errors.RayActorError,  # an actor died: its node was lost, its process crashed
        errors.WorkerCrashedError,
        errors.LocalRayletDiedError,
        errors.NodeDiedError,
        errors.OutOfMemoryError,  # killed by Ray's memory monitor
        errors.OutOfDiskError,
        errors.ObjectLostError,
        errors.ObjectStoreFullError,
        errors.RaySystemError,
        errors.RpcError,
        errors.ActorPlacementGroupRemoved,
        errors.TaskPlacementGroupRemoved,
        ConnectionError,
        TimeoutError,
    )


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and everything it wraps: chained causes, Ray task causes, worker failures."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped: list[Any] = [current.__cause__, current.__context__]
        wrapped.append(getattr(current, "cause", None))  # RayTaskError
        wrapped.extend(getattr(current, "exceptions", ()))  # ExceptionGroup
        worker_failures = getattr(current, "worker_failures", None)  # Ray Train
        if isinstance(worker_failures, dict):
            wrapped.extend(worker_failures.values())
        # Ray Train's report of a worker that died between tasks (its health check
        # failed) holds the actor's death here.
        wrapped.append(getattr(current, "health_check_failure", None))
        pending.extend(item for item in wrapped if isinstance(item, BaseException))


def is_infrastructure_failure(error: BaseException) -> bool:
    """Whether ``error`` came from the machinery under the trial, so a retry may succeed.

    True when ``error`` or anything it wraps is a Ray infrastructure error (for
    instance a Ray Train worker whose process or node died), a CUDA out-of-memory error
    (another trial sharing the GPU may have held the memory), or a
    ``ConnectionError``/``TimeoutError`` (storage or network hiccups).
    """
    infrastructure = _infrastructure_errors()
    return any(
        # The name also matches torch.cuda.OutOfMemoryError without importing torch.
        isinstance(cause, infrastructure) or type(cause).__name__ == "OutOfMemoryError"
        for cause in _causes(error)
    )


@contextlib.contextmanager
def own_failures_end_the_trial(
    report: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[None]:
    """Within this block, a failure of the trial's own ends it with a result carrying the error.

    ``report`` defaults to ``ray.tune.report``. An infrastructure failure
    (``is_infrastructure_failure``) propagates, for Tune to retry.
    """
    try:
        yield
    except Exception as error:
        if is_infrastructure_failure(error):
            raise
        logger.error("the trial failed on its own; it is not retried", exc_info=error)
        if report is None:
            from ray import tune

            report = tune.report
        report({TRIAL_ERROR_KEY: f"{type(error).__name__}: {error}"})
