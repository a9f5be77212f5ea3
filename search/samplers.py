"""Optuna samplers as the sweep pickles them.

Ray pickles the searcher, and with it the study's sampler, into the experiment state
when a sweep starts and at each snapshot. Optuna 5.1's NSGA-II sampler holds a thread
lock, which does not pickle; ``NSGAIISampler`` here leaves its locks out of the pickle
and makes fresh ones when it is read back.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna

__all__ = ["NSGAIISampler"]

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
# Stands in a pickle for a lock, which is made afresh on the way back.
_A_LOCK = "<cxrtune: a threading.Lock made afresh on unpickling>"


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable whatever locks its version holds."""

    def __getstate__(self) -> dict[str, Any]:
        return {
            name: _A_LOCK if isinstance(value, _LOCK_TYPES) else value
            for name, value in vars(self).items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {name: threading.Lock() if value == _A_LOCK else value for name, value in state.items()}
        )
