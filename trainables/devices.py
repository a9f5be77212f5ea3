"""The device a trial trains on: what Ray assigned it, and the GPU memory it shares.

A trial's tensors go to its device once (``on_device``); a trial given a share of
a GPU waits for the memory a stopped neighbour still holds (``wait_for_device_memory``)
and gives its own back as it ends (``release_device_memory``).
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DEVICE_MEMORY_SLACK",
    "DEVICE_MEMORY_WAIT_S",
    "AssignedResources",
    "assigned_resources",
    "on_device",
    "release_device_memory",
    "wait_for_device_memory",
]

logger = logging.getLogger(__name__)

# How long a trial given a GPU waits for the memory a stopped trial's process
# still holds on it, and what share of its reservation it needs free to start.
DEVICE_MEMORY_WAIT_S = 60.0
DEVICE_MEMORY_SLACK = 0.10  # CUDA contexts of the processes sharing the GPU


class AssignedResources(NamedTuple):
    """What Ray gave this trial: CPU threads, the device, and its share of a GPU."""

    threads: int
    device: torch.device
    gpus: float


def assigned_resources() -> AssignedResources:
    """The CPU threads, the device and the GPU share Ray gave this trial."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1.0)))
    gpus = float(assigned.get("GPU", 0.0))
    use_gpu = gpus > 0 and torch.cuda.is_available()
    return AssignedResources(threads, torch.device("cuda" if use_gpu else "cpu"), gpus)


def on_device(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and labels as tensors on ``device``; called once per trial.

    Every batch is then cut from them there, with no copy from the host per step.
    """
    # Arrays from Ray's object store are read-only views of shared memory; torch
    # warns about that, but nothing here writes to them, and copying would defeat
    # the sharing (on a GPU, ``.to`` copies anyway).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image_tensor = torch.from_numpy(images)
    return image_tensor.to(device), torch.as_tensor(labels, dtype=torch.long, device=device)


def release_device_memory(device: torch.device) -> None:
    """Give the GPU memory this process cached back to the device.

    A stopped trial's tensors are freed when its function unwinds, but torch's
    caching allocator keeps the blocks reserved until the process exits, and Ray
    hands the GPU to the next trial before that: Tune's function trainable stops
    without waiting for the training thread (``session.finish(timeout=0)``) and
    the actor process exits later still (ray-project/ray#23971, #30414: trials
    stopped by ASHA leaving the next one out of memory). This runs in the
    training thread as it unwinds, which is well before a new trial's process
    has started and imported torch.
    """
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def wait_for_device_memory(
    gpus: float,
    free_memory: Callable[[], tuple[int, int]],
    *,
    timeout_s: float = DEVICE_MEMORY_WAIT_S,
    poll_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait until the GPU has the memory this trial reserved free; ``False`` on timeout.

    ``free_memory`` returns ``(free, total)`` bytes of the whole device, as
    ``torch.cuda.mem_get_info`` does. A trial given ``gpus`` (a share of one
    GPU, at most 1) needs that share of the total free, less
    ``DEVICE_MEMORY_SLACK``. The other side of ``release_device_memory``: what a
    stopped trial's process still holds is gone once that process has exited,
    which Ray does not wait for. After ``timeout_s`` the trial starts anyway (a
    neighbour may simply use more than its share) and says so.
    """
    deadline = clock() + timeout_s
    while True:
        free, total = free_memory()
        needed = (min(gpus, 1.0) - DEVICE_MEMORY_SLACK) * total
        if free >= needed:
            return True
        if clock() >= deadline:
            logger.warning(
                "starting with %.1f GiB of GPU memory free, less than the %.1f GiB this "
                "trial's share of the GPU would leave",
                free / 2**30,
                needed / 2**30,
            )
            return False
        sleep(poll_s)
