"""Trial data and instrumented Ray entry points around the project's own trainable.

``train_trial`` itself is not changed. ``timed_train_trial`` patches, inside
the trial's worker process only and for the trial's duration, the module
globals ``train_one_epoch`` (to time it and stamp the first batch) and
``ray.tune.report`` (to send those timings along with each epoch's metrics).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cxrtune.trainables.fit import TrialData
from cxrtune.trainables.trainable import train_trial

ENTERED_KEY = "bench_entered_unix"  # the worker entered the trainable
FIRST_BATCH_KEY = "bench_first_batch_unix"  # train_one_epoch was first called
TRAIN_SECONDS_KEY = "bench_train_epoch_s"  # this epoch's train_one_epoch, in seconds
TRAIN_IMAGES_KEY = "bench_train_epoch_images"  # images it went through


def synthetic_trial_data(
    train: int, val: int, size: int, *, distinct: int | None = None, seed: int = 0
) -> TrialData:
    """``TrialData`` of rendered synthetic radiographs, without PNGs or ingest.

    With ``distinct``, only that many images are rendered and repeated to fill
    the arrays: enough for timing and memory, where content does not matter.
    """
    from cxrtune.trainables.synthetic import CLASS_NAMES, class_counts, render_image

    count = train + val
    rendered = min(count, distinct or count)
    counts = class_counts(rendered)
    labels = np.repeat(np.arange(len(CLASS_NAMES)), [counts[name] for name in CLASS_NAMES])
    rng = np.random.default_rng(seed)
    images = np.stack([render_image(CLASS_NAMES[label], size, rng) for label in labels])
    order = np.resize(rng.permutation(rendered), count)
    images, labels = images[order][:, None], labels[order]
    return TrialData(
        train_images=images[:train],
        train_labels=labels[:train],
        val_images=images[train:],
        val_labels=labels[train:],
        class_names=CLASS_NAMES,
        positive_index=CLASS_NAMES.index("COVID"),
    )


def timed_train_trial(config: dict[str, Any], data: TrialData) -> None:
    """``train_trial``, with each epoch's ``train_one_epoch`` timed and reported."""
    entered = time.time()
    import ray.tune

    import cxrtune.trainables.fit as fit_module

    timings: dict[str, float] = {}
    original_epoch, original_report = fit_module.train_one_epoch, ray.tune.report

    def timed_epoch(*args: Any, **kwargs: Any) -> float:
        timings.setdefault(FIRST_BATCH_KEY, time.time())
        started = time.perf_counter()
        loss = original_epoch(*args, **kwargs)
        timings[TRAIN_SECONDS_KEY] = time.perf_counter() - started
        timings[TRAIN_IMAGES_KEY] = len(args[4])  # order: the examples of this epoch
        return loss

    def report(metrics: dict[str, Any], **kwargs: Any) -> None:
        original_report({**metrics, ENTERED_KEY: entered, **timings}, **kwargs)

    fit_module.train_one_epoch = timed_epoch
    ray.tune.report = report
    try:
        train_trial(config, data)
    finally:
        fit_module.train_one_epoch = original_epoch
        ray.tune.report = original_report


BARRIER_KEY = "bench_barrier_dir"  # config key: where concurrent trials meet
PARTIES_KEY = "bench_parties"  # config key: how many trials meet there
BARRIER_TIMEOUT_S = 120.0


def touch_then_train(
    config: dict[str, Any], data: TrialData, train_count: int, val_count: int
) -> None:
    """Read every byte of the shared arrays, wait for the other trials, then train on a few.

    A real epoch over a 300 MB dataset takes minutes on a CPU; reading it all
    maps every page into this process as that epoch would, and the short
    training that follows adds the model, optimizer and activation memory. The
    trials of one run start training together (they meet in the folder under
    ``BARRIER_KEY``), so their peaks overlap as in a long concurrent sweep. The
    slices are views: nothing is copied out of the object store.
    """
    config = dict(config)
    barrier, parties = Path(config.pop(BARRIER_KEY)), int(config.pop(PARTIES_KEY))
    int(data.train_images.max())
    int(data.val_images.max())
    (barrier / uuid.uuid4().hex).touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while sum(1 for _ in barrier.iterdir()) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{parties} trials did not all start within {BARRIER_TIMEOUT_S}s")
        time.sleep(0.05)
    subset = TrialData(
        train_images=data.train_images[:train_count],
        train_labels=data.train_labels[:train_count],
        val_images=data.val_images[:val_count],
        val_labels=data.val_labels[:val_count],
        class_names=data.class_names,
        positive_index=data.positive_index,
    )
    train_trial(config, subset)
