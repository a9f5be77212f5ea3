"""trial_overhead: the engine inside a real Ray Tune trial vs in a plain loop, and trial start-up.

Per family, the same ``TrialConfig`` and data train for a few epochs twice: in
a fresh process (``train_one_epoch`` in a loop, one torch thread, as a 1-CPU
trial gets; ``benchmarks._plain_loop``) and as a one-trial ``Tuner.fit()`` of
``train_trial`` wired as ``build_tuner`` wires it (``with_parameters``,
per-family resources). The figure is ``train_one_epoch``'s images/s over the
epochs after the first, Ray over plain.

Start-up is the time from just before ``Tuner.fit()`` to the trial's first
batch, with the data already in the object store; it is split at the
``on_trial_start`` callback and at the trainable's entry.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    BenchmarkResult,
    Goal,
    Row,
    Settings,
    Side,
    interleave,
    private_ray,
    ratio_row,
    register_benchmark,
)
from benchmarks._plain_loop import save_trial_data
from benchmarks._trials import (
    ENTERED_KEY,
    FIRST_BATCH_KEY,
    TRAIN_IMAGES_KEY,
    TRAIN_SECONDS_KEY,
    synthetic_trial_data,
    timed_train_trial,
)
from cxrtune.trainables.config import TrialConfig

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
# Per family: the hyperparameters that differ from the shared ones below.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "baseline_cnn": {},
    "regularized_cnn": {"dropout": 0.3, "weight_decay": 1e-4, "augment_strength": 0.3},
    "vgg16": {"lr": 3e-4, "dropout": 0.3, "finetune_blocks": 1},
}
SHARED_SETTINGS: dict[str, Any] = {"lr": 1e-3, "batch_size": 32, "imbalance": "none", "seed": 0}
THROUGHPUT_GOAL = Goal(">=", 0.95)
STARTUP_GOAL = Goal("<", 3.0)


def steady_images_per_second(images: list[float], seconds: list[float]) -> float:
    """Images/s over every epoch but the first (which pays one-off warm-up), if there are more."""
    start = 1 if len(images) > 1 else 0
    return sum(images[start:]) / sum(seconds[start:])


def plain_loop(config: TrialConfig, data_path: Path) -> float:
    """The engine in a plain loop in a fresh process (``benchmarks._plain_loop``)."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks._plain_loop",
            str(data_path),
            json.dumps(config.to_dict()),
        ],
        cwd=REPO,
        # Ray sets this in a 1-CPU worker; the loop sets one torch thread as the trial does.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    timings = json.loads(completed.stdout.strip().splitlines()[-1])
    return steady_images_per_second(timings["images"], timings["seconds"])


def import_seconds() -> dict[str, float]:
    """What a fresh process spends importing what a trial's worker imports."""
    code = (
        "import json, time\n"
        "started = time.perf_counter(); import ray.tune; tune = time.perf_counter()\n"
        "import torch; torch_done = time.perf_counter()\n"
        "import cxrtune.trainables.trainable; done = time.perf_counter()\n"
        "print(json.dumps({'ray.tune': tune - started, 'torch': torch_done - tune,"
        " 'cxrtune.trainables.trainable (after torch)': done - torch_done}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def ray_trial(trainable: Any, config: TrialConfig, storage: Path) -> dict[str, float]:
    """One ``Tuner.fit()`` of one trial: its steady images/s and the start-up split."""
    from ray import tune

    class StartStamp(tune.Callback):
        started = float("nan")

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started = time.time()

    stamp = StartStamp()
    tuner = tune.Tuner(
        trainable,
        param_space=config.to_dict(),
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name=f"trial-overhead-{uuid.uuid4().hex[:8]}",
            storage_path=str(storage),
            callbacks=[stamp],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    fit_called = time.time()
    results = tuner.fit()
    result = results[0]
    if result.error is not None:
        raise RuntimeError(f"the benchmark trial failed: {result.error}") from result.error
    epochs, last = result.metrics_dataframe, result.metrics
    if epochs is None or last is None:
        raise RuntimeError("the benchmark trial reported nothing")
    epochs = epochs.sort_values("epoch")
    first_batch = last[FIRST_BATCH_KEY]
    return {
        "images_per_s": steady_images_per_second(
            list(epochs[TRAIN_IMAGES_KEY]), list(epochs[TRAIN_SECONDS_KEY])
        ),
        "startup_s": first_batch - fit_called,
        "fit_to_trial_start_s": stamp.started - fit_called,
        "trial_start_to_trainable_s": last[ENTERED_KEY] - stamp.started,
        "trainable_to_first_batch_s": first_batch - last[ENTERED_KEY],
    }


@register_benchmark(
    "trial_overhead",
    "train_one_epoch images/s in a Ray Tune trial vs a plain loop; trial start-up seconds",
)
def trial_overhead(settings: Settings) -> BenchmarkResult:
    from ray import tune

    from cxrtune.search.tuner import FamilyResourcesFn

    epochs = 1 if settings.quick else 3
    result = BenchmarkResult(
        details={
            "image_size": IMAGE_SIZE,
            "epochs": epochs,
            "images_per_s_over": "epochs 2.. (epoch 1 when there is one)",
            # Where the start-up goes; left out of --quick, which only checks the wiring.
            "fresh_process_import_s": None if settings.quick else import_seconds(),
        }
    )
    storage = settings.workdir / "trial_overhead"
    storage.mkdir(parents=True, exist_ok=True)
    with private_ray():
        families = list(FAMILY_SETTINGS)[:1] if settings.quick else list(FAMILY_SETTINGS)
        for family in families:
            family_settings = FAMILY_SETTINGS[family]
            train = (96 if settings.quick else 768) // (6 if family == "vgg16" else 1)
            data = synthetic_trial_data(train, max(32, train // 4), IMAGE_SIZE, distinct=200)
            data_path = storage / f"{family}.npz"
            save_trial_data(data, data_path)
            config = TrialConfig.from_dict(
                {**SHARED_SETTINGS, **family_settings, "family": family, "max_epochs": epochs}
            )
            # Built once, so the data go to the object store before any timing starts.
            resources = FamilyResourcesFn(((family, 1.0, 0.0, 1),))
            trainable = tune.with_resources(
                tune.with_parameters(timed_train_trial, data=data), resources
            )
            plain, in_ray = interleave(
                partial(plain_loop, config, data_path),
                partial(ray_trial, trainable, config, storage),
                settings.repeats,
            )
            notes = f"{IMAGE_SIZE} px, {train} train images, batch 32, {epochs} epoch(s)"
            result.rows.append(
                ratio_row(
                    f"{family} images/s",
                    Side("plain loop, fresh process, 1 thread", "images/s", plain),
                    Side(
                        "Ray Tune trial, 1 CPU", "images/s", [run["images_per_s"] for run in in_ray]
                    ),
                    THROUGHPUT_GOAL,
                    notes=notes,
                )
            )
            startup = Side("Tuner.fit() to first batch", "s", [run["startup_s"] for run in in_ray])
            split = {
                key: [run[key] for run in in_ray]
                for key in (
                    "fit_to_trial_start_s",
                    "trial_start_to_trainable_s",
                    "trainable_to_first_batch_s",
                )
            }
            medians = {key: statistics.median(values) for key, values in split.items()}
            result.rows.append(
                Row(
                    case=f"{family} start-up",
                    figure=startup.median,
                    figure_kind="seconds",
                    goal=STARTUP_GOAL,
                    candidate=startup,
                    notes="median split: fit->on_trial_start {fit_to_trial_start_s:.2f}s, "
                    "on_trial_start->trainable {trial_start_to_trainable_s:.2f}s, "
                    "trainable->first batch {trainable_to_first_batch_s:.2f}s".format(**medians),
                    extra={"split_s": split, "split_median_s": medians},
                )
            )
    return result
