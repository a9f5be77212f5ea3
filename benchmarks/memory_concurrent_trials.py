"""memory_concurrent_trials: peak memory of two concurrent trials vs one, on a 300 MB dataset.

The trials share the dataset through Ray's object store (``with_parameters``),
so a second trial should add its own model, optimizer and activations, not a
second copy of the data. Memory is the proportional set size (PSS, from
``/proc/<pid>/smaps_rollup`` via psutil): each shared page is split among the
processes that map it, so a sum over processes counts it once. RSS, which
counts a shared page in every process that maps it, is reported beside it, and
so are the shared-memory part of PSS (the object store lives in /dev/shm: it
should not grow with the second trial) and the anonymous part (heap and
activations: what the second trial adds).

Two datasets of about 300 MB: 6,000 images at 224 px and 73,400 at 64 px.
Each trial first reads every byte of the shared arrays (mapping them all, as an
epoch would), waits for the run's other trial, then trains one epoch on the
first 64 images and evaluates the first 256 validation images (one ``evaluate``
batch at its default size, where a trial's memory peaks): a full epoch over
300 MB takes minutes on a CPU (``benchmarks._trials.touch_then_train``).
The driver drops its own copy of the arrays once they are in the object store;
a real sweep's driver also keeps its decoded dataset, which would add the same
amount to both sides.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    BenchmarkResult,
    Goal,
    Row,
    Settings,
    Side,
    import_psutil,
    interleave,
    private_ray,
    ratio_row,
    register_benchmark,
)
from benchmarks._trials import BARRIER_KEY, PARTIES_KEY, synthetic_trial_data, touch_then_train
from cxrtune.trainables.engine import evaluate

# Pixels per side -> (train, val) images; both about 300 MB of uint8 in the object store.
# At 224 px a trial's activations dominate its memory, at 64 px (the quickstart's size)
# its runtime does.
CASES = {224: (5_100, 900), 64: (62_400, 11_000)}
EPOCHS = 1
# One batch of engine.evaluate, at its default size: where a trial's memory peaks.
EVALUATE_BATCH = int(inspect.signature(evaluate).parameters["batch_size"].default)
SAMPLE_INTERVAL_S = 0.2
MIB = 2**20
GOAL = Goal("<", 1.3)
TRIAL = {
    "family": "baseline_cnn",
    "lr": 1e-3,
    "batch_size": 32,
    "imbalance": "none",
}
GOAL_MEASURE = "pss_driver_workers"
# Reported for each case; only the goal measure is judged. The rest stay in the details.
MEASURES = {
    GOAL_MEASURE: "PSS, driver + Ray workers",
    "rss_driver_workers": "RSS (shared pages counted per process)",
    "pss_shmem_driver_workers": "shared memory (object store) PSS",
    "pss_anon_driver_workers": "anonymous (heap, activations) PSS",
}


def process_kind(process: Any, driver_pid: int) -> str:
    """``driver``, ``worker`` (a Ray worker: its title starts with ``ray::``) or ``system``."""
    if process.pid == driver_pid:
        return "driver"
    command = process.cmdline()
    return "worker" if command and command[0].startswith("ray::") else "system"


def smaps_rollup(pid: int) -> dict[str, float]:
    """The process's memory totals from ``/proc/<pid>/smaps_rollup``, in MiB.

    ``Pss_Shmem`` is its share of shared memory (Ray's object store lives in
    /dev/shm), ``Pss_Anon`` its share of anonymous memory (heap, activations).
    Raises ``FileNotFoundError`` or ``ProcessLookupError`` once the process is gone.
    """
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name] = float(value.split()[0]) / 1024  # kB
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
        "pss_shmem": fields["Pss_Shmem"],
        "pss_anon": fields["Pss_Anon"],
    }


class MemorySampler:
    """Samples, in a thread, the memory of this process and all its descendants; keeps peaks."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.psutil = import_psutil()
        self.interval_s = interval_s
        self.peaks: dict[str, float] = defaultdict(float)  # MiB
        self.at_peak: dict[str, float] = {}  # PSS by kind and part, at the goal measure's peak
        self.max_trial_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        driver = self.psutil.Process()
        totals: dict[str, float] = defaultdict(float)
        parts: dict[str, float] = defaultdict(float)
        trial_processes = 0
        for process in [driver, *driver.children(recursive=True)]:
            try:
                kind = process_kind(process, driver.pid)
                memory = smaps_rollup(process.pid)
                title = process.cmdline()[0] if kind == "worker" else ""
            except (
                self.psutil.NoSuchProcess,
                self.psutil.ZombieProcess,
                FileNotFoundError,
                ProcessLookupError,
            ):
                continue  # it ended between the listing and the reading
            trial_processes += title.startswith("ray::ImplicitFunc")
            parts[f"{kind}_pss"] += memory["pss"]
            totals["pss_all"] += memory["pss"]
            if kind != "system":
                for measure in ("pss", "rss", "uss", "pss_shmem", "pss_anon"):
                    totals[f"{measure}_driver_workers"] += memory[measure]
        if totals[GOAL_MEASURE] > self.peaks[GOAL_MEASURE]:
            self.at_peak = {
                **parts,
                "shmem_pss": totals["pss_shmem_driver_workers"],
                "anon_pss": totals["pss_anon_driver_workers"],
            }
        for key, value in totals.items():
            self.peaks[key] = max(self.peaks[key], value)
        self.max_trial_processes = max(self.max_trial_processes, trial_processes)
        self.samples += 1


def run_trials(trainable: Any, trials: int, epochs: int, storage: Path) -> dict[str, Any]:
    """``trials`` concurrent trials in one ``Tuner.fit()``; the peaks seen meanwhile."""
    from ray import tune

    barrier = storage / f"barrier-{uuid.uuid4().hex[:8]}"
    barrier.mkdir(parents=True)
    tuner = tune.Tuner(
        trainable,
        param_space={
            **TRIAL,
            "max_epochs": epochs,
            "seed": tune.grid_search(list(range(trials))),
            BARRIER_KEY: str(barrier),
            PARTIES_KEY: trials,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=trials),
        run_config=tune.RunConfig(
            name=f"memory-{trials}-{uuid.uuid4().hex[:8]}",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    with MemorySampler() as sampler:
        results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"a memory benchmark trial failed: {results.errors[0]}")
    time.sleep(1.0)  # let the trials' worker processes exit before the next run samples
    return {
        **sampler.peaks,
        "at_peak_mib": sampler.at_peak,
        "max_trial_processes": sampler.max_trial_processes,
        "samples": sampler.samples,
    }


def measure_case(
    settings: Settings, image_size: int, train_images: int, val_images: int
) -> tuple[dict[str, Any], list[Row]]:
    """1 vs 2 concurrent trials on one dataset size, in a Ray instance of its own."""
    from ray import tune

    from cxrtune.search.tuner import FamilyResourcesFn

    train_count, val_count = (32, 32) if settings.quick else (64, EVALUATE_BATCH)
    storage = settings.workdir / "memory"
    data = synthetic_trial_data(train_images, val_images, image_size, distinct=100)
    dataset_mib = (data.train_images.nbytes + data.val_images.nbytes) / MIB
    with private_ray():
        trainable = tune.with_resources(
            tune.with_parameters(
                touch_then_train, data=data, train_count=train_count, val_count=val_count
            ),
            FamilyResourcesFn(((TRIAL["family"], 1.0, 0.0, 1),)),
        )
        del data  # in the object store now; the driver keeps no copy of its own
        with MemorySampler() as idle:
            time.sleep(1.0)
        one, two = interleave(
            lambda: run_trials(trainable, 1, EPOCHS, storage),
            lambda: run_trials(trainable, 2, EPOCHS, storage),
            settings.repeats,
        )
    for run in two:
        if run["max_trial_processes"] < 2:
            raise RuntimeError("the two trials did not overlap; check the CPUs Ray has")
    details = {
        "dataset_mib": dataset_mib,
        "images": train_images + val_images,
        "train_images_trained": train_count,
        "val_images_evaluated": val_count,
        "idle_before_trials_mib": dict(idle.peaks),
        "runs_1_trial": one,
        "runs_2_trials": two,
    }
    case = f"{image_size} px"
    notes = (
        f"{dataset_mib:.0f} MiB dataset ({train_images + val_images:,} images), "
        f"{TRIAL['family']}, batch {TRIAL['batch_size']}, evaluate batch {val_count}"
    )
    rows = []
    for key, label in MEASURES.items():
        baseline = Side("1 trial", "MiB", [run[key] for run in one])
        candidate = Side("2 concurrent trials", "MiB", [run[key] for run in two])
        row = ratio_row(f"{case}, {label}", baseline, candidate, GOAL, notes=notes)
        if key != GOAL_MEASURE:
            row.goal = None  # reported beside the goal, not judged
        row.extra["second_trial_adds_mib"] = candidate.median - baseline.median
        rows.append(row)
    return details, rows


@register_benchmark(
    "memory_concurrent_trials",
    "peak memory (PSS) of 2 concurrent trials vs 1 on a 300 MB dataset in the object store",
)
def memory_concurrent_trials(settings: Settings) -> BenchmarkResult:
    result = BenchmarkResult(
        details={
            "trial": {**TRIAL, "max_epochs": EPOCHS},
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "memory_measure": "PSS from /proc/<pid>/smaps_rollup, summed over the driver and "
            "the Ray worker processes (processes listed with psutil); Pss_Shmem and Pss_Anon "
            "are its shared-memory and anonymous parts",
        }
    )
    cases = list(CASES.items())[:1] if settings.quick else list(CASES.items())
    for image_size, (train_images, val_images) in cases:
        details, rows = measure_case(settings, image_size, train_images, val_images)
        result.details[f"{image_size}px"] = details
        result.rows += rows
    return result
