"""Environment variables Ray reads, set before Ray is imported or started.

Kept free of heavy imports, so the command line can set them first thing.
"""

from __future__ import annotations

import os

__all__ = [
    "LOOPBACK_RAY_ENVIRONMENT",
    "SWEEP_TUNE_ENVIRONMENT",
    "check_loopback_ray",
    "use_loopback_ray",
]

# Read by Ray when it is imported, so they are set before the first ``import ray``.
LOOPBACK_RAY_ENVIRONMENT = {
    # Otherwise Ray swaps 127.0.0.1 for the machine's outward address and its servers
    # listen on every interface. This is the switch Ray itself uses to keep a laptop's
    # single-node instance on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# Read when a sweep starts.
SWEEP_TUNE_ENVIRONMENT = {
    # The legacy reporter at verbosity 0 prints nothing; the sweep prints its own progress.
    "RAY_AIR_NEW_OUTPUT": "0",
    # A checkpoint every epoch is intended, not a misconfiguration to warn about.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # A trial that fails on its own ends with a result holding its error and no
    # metric (cxrtune.trainables.failures); Tune's check that every result holds the
    # searched metrics would turn that into a driver error. The sweep file's metric
    # names are checked against the known keys when it is read.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # The driver keeps a record of every checkpoint of every trial; with this, each
    # record holds the scheduler's metric alone instead of a copy of the epoch's whole
    # result. Nothing reads the rest there: results are read from the trials' files.
    "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE": "1",
}


def use_loopback_ray() -> None:
    """Keep a locally started Ray on 127.0.0.1; call before Ray is first imported."""
    for name, value in LOOPBACK_RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def check_loopback_ray() -> None:
    """Refuse to start a local Ray that would listen beyond loopback.

    Ray reads ``LOOPBACK_RAY_ENVIRONMENT`` once, when it is first imported: imported
    before ``use_loopback_ray``, it would bind every interface under the machine's
    outward address, although the environment asks for loopback.
    """
    from ray._private import ray_constants

    asked = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    if asked and ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "Ray was imported before use_loopback_ray() ran, so a local instance would "
            "listen on every interface; call it before anything imports ray"
        )
