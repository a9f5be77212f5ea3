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

# A lock in a pickle: the name of the kind, made afresh on the way back.
_LOCKS = {type(threading.Lock()): "threading.Lock", type(threading.RLock()): "threading.RLock"}
_NEW_LOCK = {"threading.Lock": threading.Lock, "threading.RLock": threading.RLock}
_MARK = "<cxrtune: made afresh on unpickling> "


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable whatever locks its version holds."""

    def __getstate__(self) -> dict[str, Any]:
        return {
            name: _MARK + _LOCKS[type(value)] if type(value) in _LOCKS else value
            for name, value in vars(self).items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {
                name: (
                    _NEW_LOCK[value.removeprefix(_MARK)]()
                    if isinstance(value, str) and value.startswith(_MARK)
                    else value
                )
                for name, value in state.items()
            }
        )
