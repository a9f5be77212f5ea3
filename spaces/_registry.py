"""The registry of named search spaces, and the registry every named kind of thing uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

# The three architecture families, in the order of the original study. The one list
# of them: the model registry, the trial config and the sweep file all check against it.
FAMILIES: tuple[str, ...] = ("baseline_cnn", "regularized_cnn", "vgg16")
# How a trial counters class imbalance: not at all, by resampling, or by loss weights.
IMBALANCE_STRATEGIES: tuple[str, ...] = ("none", "oversample", "class_weight")

Entry = TypeVar("Entry")
Registered = TypeVar("Registered")


class Registry(dict[str, Entry], Generic[Entry]):
    """Named things of one kind (search spaces, model families, dataset layouts).

    A dict in registration order, filled through ``add`` or the ``register``
    decorator, which refuse a name twice; ``lookup`` of an unknown name raises a
    ``ValueError`` listing the known ones.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # what an entry is, in messages: "search space"

    def add(self, name: str, entry: Entry) -> None:
        """Register ``entry`` as ``name``; a second use of a name is an error."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry

    def register(self, name: str) -> Callable[[Registered], Registered]:
        """A decorator registering the function it decorates as ``name``."""

        def decorate(function: Registered) -> Registered:
            self.add(name, function)  # type: ignore[arg-type]
            return function

        return decorate

    def lookup(self, name: str) -> Entry:
        """The entry registered as ``name``; an unknown name raises listing the known ones."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None


class SpaceFunction(Protocol):
    """Samples one trial's hyperparameters into ``trial``; returns the fixed ones."""

    def __call__(self, trial: Any, families: Sequence[str]) -> dict[str, Any]: ...


SPACES: Registry[SpaceFunction] = Registry("search space")


def register_space(name: str) -> Callable[[SpaceFunction], SpaceFunction]:
    """Register a define-by-run space under ``name``; a second use of a name is an error."""
    return SPACES.register(name)


def get_space(name: str) -> SpaceFunction:
    """The space registered as ``name``; unknown names raise listing the known ones."""
    return SPACES.lookup(name)
