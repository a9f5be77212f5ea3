"""The registry of named search spaces."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

# The three architecture families, in the order of the original study. The one list
# of them: the model registry, the trial config and the sweep file all check against it.
FAMILIES: tuple[str, ...] = ("baseline_cnn", "regularized_cnn", "vgg16")
# How a trial counters class imbalance: not at all, by resampling, or by loss weights.
IMBALANCE_STRATEGIES: tuple[str, ...] = ("none", "oversample", "class_weight")


class SpaceFunction(Protocol):
    """Samples one trial's hyperparameters into ``trial``; returns the fixed ones."""

    def __call__(self, trial: Any, families: Sequence[str]) -> dict[str, Any]: ...


SPACES: dict[str, SpaceFunction] = {}


def register_space(name: str) -> Callable[[SpaceFunction], SpaceFunction]:
    """Register a define-by-run space under ``name``; a second use of a name is an error."""

    def decorate(function: SpaceFunction) -> SpaceFunction:
        if name in SPACES:
            raise ValueError(f"search space {name!r} is already registered")
        SPACES[name] = function
        return function

    return decorate


def get_space(name: str) -> SpaceFunction:
    """The space registered as ``name``; unknown names raise listing the known ones."""
    try:
        return SPACES[name]
    except KeyError:
        known = ", ".join(sorted(SPACES))
        raise ValueError(f"unknown search space {name!r}; known spaces: {known}") from None
