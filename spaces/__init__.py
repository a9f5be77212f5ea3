"""Search spaces: which hyperparameters each model family has, and their ranges.

A space is an Optuna define-by-run function registered by name. It samples the
family first, then that family's parameters, and returns the values it holds
fixed (so every trial config names every hyperparameter). This package imports
neither Ray nor torch.
"""

from cxrtune.spaces import _spaces  # noqa: F401  (registers the built-in spaces)
from cxrtune.spaces._registry import (
    FAMILIES,
    IMBALANCE_STRATEGIES,
    SPACES,
    Registry,
    SpaceFunction,
    get_space,
    register_space,
)

__all__ = [
    "FAMILIES",
    "IMBALANCE_STRATEGIES",
    "SPACES",
    "Registry",
    "SpaceFunction",
    "get_space",
    "register_space",
]
