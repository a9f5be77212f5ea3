"""Which trial failures Ray Tune retries: lost infrastructure yes, the trial's own errors no.

``FailureConfig(max_failures=N)`` makes Tune restart every failed trial from its
last checkpoint up to N times, whatever the failure. That is right when a node
was lost, a worker process died or Ray's memory monitor killed it, and wasted
(or worse, misleading) when the trial itself raised: a non-finite loss
(``NonFiniteLossError``), a bad config or a bug fail again the same way from
the same checkpoint. Such a trial is marked errored at once, its message kept
for the leaderboard, and the sweep goes on.

Retried (``is_retryable``): everything that is not an exception raised by the
trial's code (a dead actor or node, Tune's own errors), and, among exceptions
the trial's code raised, those caused by the same infrastructure (a Ray error,
for instance from Ray Train workers inside the trial), a CUDA out-of-memory
error (another trial sharing the GPU may have held the memory), and
``ConnectionError``/``TimeoutError`` (storage or network hiccups).

Tune has no public hook for this decision: ``TuneController`` asks
``Trial.should_recover()``, which only compares the failure count with
``max_failures``. ``retry_only_retryable_errors`` wraps the controller's
failure handling for the duration of a ``Tuner.fit()`` so that a non-retryable
failure is handled with that trial's retry budget at zero. The e2e and unit
tests pin this behaviour, so a Ray upgrade that moves the hook fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["is_retryable", "retry_only_retryable_errors"]


def _infrastructure_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as errors

    return (
        errors.RayActorError,  # the actor died: its node was lost, its process crashed
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
        pending.extend(item for item in wrapped if isinstance(item, BaseException))


def is_retryable(error: BaseException) -> bool:
    """Whether a trial that failed with ``error`` may be retried from its last checkpoint."""
    from ray.exceptions import RayTaskError

    if not isinstance(error, RayTaskError):
        return True  # not raised by the trial's code: an actor, node or Tune failure
    retryable = _infrastructure_errors()
    for cause in _causes(error):
        if isinstance(cause, retryable) or type(cause).__name__ == "OutOfMemoryError":
            # The name also matches torch.cuda.OutOfMemoryError without importing torch.
            return True
    return False


@contextlib.contextmanager
def retry_only_retryable_errors() -> Iterator[None]:
    """Within this block, Tune retries a failed trial only when ``is_retryable`` says so."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._process_trial_failure

    @functools.wraps(original)
    def process_trial_failure(controller: Any, trial: Any, exception: Any) -> Any:
        if is_retryable(exception):
            return original(controller, trial, exception=exception)
        budget = trial.max_failures
        trial.max_failures = 0  # Trial.should_recover() then says no
        try:
            return original(controller, trial, exception=exception)
        finally:
            trial.max_failures = budget

    TuneController._process_trial_failure = process_trial_failure  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        TuneController._process_trial_failure = original  # type: ignore[method-assign]
