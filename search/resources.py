"""What each trial asks Ray for: one bundle, looked up by the trial's family.

Free of torch, so that a process which only unpickles a trainable (a worker, a
benchmark's replayed trial) does not import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune import PlacementGroupFactory

from cxrtune.trainables.config import FamilyResources

if TYPE_CHECKING:
    from cxrtune.search.config import SweepConfig

__all__ = ["DATA_PARALLEL_DRIVER", "FamilyResourcesFn", "data_parallel_resources"]

# What the Tune trial of a data-parallel family reserves for itself: it only
# starts the Ray Train run, waits, and copies each checkpoint into the trial
# folder. Ray Train reserves the workers' resources in a placement group of its own.
DATA_PARALLEL_DRIVER = {"CPU": 0.25}


@dataclass(frozen=True)
class FamilyResourcesFn:
    """Per-trial resource request, looked up by the trial's family.

    A single-worker trial trains in the Tune trial's own bundle (a GPU fraction
    lets several trials share one GPU). A data-parallel trial's bundle holds only
    its driver, ``DATA_PARALLEL_DRIVER``.
    """

    resources: tuple[tuple[str, float, float, int], ...]  # (family, cpus, gpus, workers)

    @classmethod
    def for_sweep(cls, config: SweepConfig) -> FamilyResourcesFn:
        """The sweep file's ``resources``, family by family."""
        return cls(
            tuple((family, r.cpus, r.gpus, r.workers) for family, r in config.resources.items())
        )

    def __call__(self, config: dict[str, Any]) -> PlacementGroupFactory:
        for family, cpus, gpus, workers in self.resources:
            if family == config["family"]:
                if workers > 1:
                    return one_bundle(tuple(DATA_PARALLEL_DRIVER.items()))
                return one_bundle((("CPU", cpus), ("GPU", gpus)))
        raise ValueError(f"no resources configured for family {config['family']!r}")


@functools.cache
def one_bundle(resources: tuple[tuple[str, float], ...]) -> PlacementGroupFactory:
    """The request for one bundle of ``resources``, one object for every trial that asks it.

    Each trial keeps its request for as long as the driver runs, and a request holds
    a bound signature of Ray's ``placement_group`` (about 2 KB): one per trial would
    grow the driver by that much per trial. Tune never changes a trial's request in
    place; it only assigns a new one.
    """
    return PlacementGroupFactory([dict(resources)])


def data_parallel_resources(config: SweepConfig) -> dict[str, FamilyResources]:
    """The families that train data-parallel, with what each of their workers holds."""
    return {
        family: resources for family, resources in config.resources.items() if resources.workers > 1
    }
