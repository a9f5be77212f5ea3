"""cluster_scale: thousands of replayed trials on a simulated multi-GPU cluster.

A Ray head and worker nodes run on 127.0.0.1, started with ``ray start`` and token
authentication (``_cluster``); each worker node declares 4 GPUs it does not have.
The sweep is ``cxrtune sweep --address`` with one change, its trials: each replays a
recorded learning curve for a fixed time per epoch and writes a small real
checkpoint (``_cluster_driver``). The searcher, ASHA, checkpoints, storage, the
Optuna journal and the leaderboard are the sweep's own. The driver is killed when
half the trials have started and finished with ``cxrtune resume``.

Measured, from outside the driver (``/proc``) and from the experiment dir after:

- packing: trials at once per assigned GPU id (at most 4 at ``gpus: 0.25``) and per
  node (16 on a 4-GPU node), and that every trial saw exactly one GPU id;
- driver CPU seconds per trial, at 1,000 trials and at the end, and per reported
  epoch (which bounds the trials at once one driver keeps up with), and the wall
  clock against the ideal schedule (every slot busy from the first epoch to the last);
- driver memory (RSS) from trial 1,000 to the end;
- bytes of the experiment dir per trial, at half the trials and at the end;
- the searcher's ask and tell latency as the study grows (``_searcher_latency``);
- ``cxrtune leaderboard`` and ``cxrtune report`` on the finished experiment dir;
- that the resumed sweep ends with exactly the trials asked for.

``--trials N`` sets the sweep's size (default 10,000; 200 with ``--quick``, on one
worker node with 2 GPUs: the CI-sized run).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._cluster import LoopbackCluster, NodeSpec, loopback_cluster, session_members
from benchmarks._cluster_driver import EPOCH_SECONDS_VARIABLE
from benchmarks._harness import BenchmarkResult, Goal, Row, Settings, Side, register_benchmark
from benchmarks._searcher_latency import SearcherLatency, measure_searcher_latency
from cxrtune.search.sweep import UNRECORDED_TRIALS_DIR

REPO = Path(__file__).resolve().parents[1]
PLOT = REPO / "benchmarks" / "results" / "cluster_scale.png"
TRIALS, QUICK_TRIALS = 10_000, 200
GPUS_PER_NODE = 4
GPU_SHARE = 0.25  # of a GPU per trial: four trials share each
# Worker nodes of the full run and of --quick. A node's CPUs only bound its trials
# (one each); nothing computes.
WORKER_NODES, QUICK_WORKER_NODES = 2, 1
QUICK_GPUS_PER_NODE = 2
# A replayed epoch's length (seconds): long enough that every slot fills, as with
# real epochs, short enough that ten thousand trials end within the hour.
EPOCH_SECONDS = 0.5
MAX_EPOCHS = 6
# An epoch of a real trial on a GPU share, for the trials-at-once a driver keeps up with.
REAL_EPOCH_S = 60.0
# Study sizes at which the searcher's latency is read (its own run, without Ray).
LATENCY_SIZES, QUICK_LATENCY_SIZES = (100, 1_000, 5_000, 10_000), (50, 100, 200)
WINDOW_TRIALS = 250
EARLY = 1_000  # "at 1,000 trials": the first reading of driver CPU and memory
SAMPLE_PERIOD_S = 1.0  # driver CPU and memory
DIR_SAMPLE_PERIOD_S = 30.0  # experiment dir size: a walk of every trial folder
SWEEP_TIMEOUT_S = 3 * 3600.0
CPU_GOAL, MEMORY_GOAL_MB, ASK_TELL_GOAL_S = Goal("<=", 0.1), Goal("<=", 200), Goal("<=", 0.05)
LEADERBOARD_GOAL_S, REPORT_GOAL_S = Goal("<=", 60), Goal("<=", 120)


def sweep_overrides(storage: Path, trials: int, slots: int) -> list[str]:
    """The sweep file's keys, as ``--set`` values: small models, every trial on a GPU share."""
    settings: dict[str, Any] = {
        "storage_path": storage,
        "space": "quick",
        "families": "[baseline_cnn, regularized_cnn]",
        # Small images: the checkpoints stay small (about 0.5 MB) and test evaluation quick.
        "image_size": 8,
        "synthetic.size": 8,
        "synthetic.n": 400,
        "num_samples": trials,
        "max_epochs": MAX_EPOCHS,
        "grace_period": 1,
        # A custom searcher gets one pending trial at a time from Tune unless the sweep
        # caps concurrency, which lets Tune keep that many trials pending.
        "max_concurrent_trials": slots,
        "checkpoints_to_keep": 1,
        # TPE's ask grows with the study (about 0.6 s at 10,000 trials); a window keeps it
        # near 20 ms, as docs/sweep-file.md recommends for sweeps of thousands.
        "tpe_window_trials": WINDOW_TRIALS,
    }
    for family in ("baseline_cnn", "regularized_cnn"):
        settings[f"resources.{family}.cpus"] = 1
        settings[f"resources.{family}.gpus"] = GPU_SHARE
    return [f"{key}={value}" for key, value in settings.items()]


def is_search_key(override: str) -> bool:
    """Whether a sweep override shapes the searcher (the space), not storage or resources."""
    key = override.split("=")[0]
    return key in ("space", "families", "max_epochs", "grace_period", "tpe_window_trials")


@dataclass
class DriverSamples:
    """Readings of one driver process: (seconds since start, CPU seconds, RSS bytes)."""

    readings: list[tuple[float, float, int]] = field(default_factory=list)


def process_reading(pid: int) -> tuple[float, int] | None:
    """User + system CPU seconds and resident bytes of ``pid``; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")]
    if not rss:
        return None  # exited, not yet reaped
    rss_kib = rss[0]
    # Fields 14 and 15 of /proc/PID/stat (utime, stime); 12 and 13 after the name.
    return (int(stat[11]) + int(stat[12])) / ticks, rss_kib * 1024


def folder_bytes(root: Path) -> int:
    total = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # a checkpoint Ray removed while being counted
    return total


def trial_folders(experiment: Path) -> int:
    if not experiment.is_dir():
        return 0
    return sum(1 for entry in os.scandir(experiment) if entry.is_dir() and "_" in entry.name)


def run_driver(
    command: list[str],
    cluster: LoopbackCluster,
    experiment: Path,
    log: Path,
    *,
    kill_at_trials: int | None = None,
) -> tuple[DriverSamples, list[tuple[float, int]], bool]:
    """Run one driver to its end (or kill it once ``kill_at_trials`` trials have started).

    Returns its readings, the experiment dir's size over time (time, bytes) and
    whether it was killed.
    """
    environment = {**cluster.environment, EPOCH_SECONDS_VARIABLE: str(EPOCH_SECONDS)}
    started = time.time()
    with log.open("ab") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._cluster_driver", *command],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    samples, sizes, killed = DriverSamples(), [], False
    last_size = 0.0
    while driver.poll() is None:
        reading = process_reading(driver.pid)
        now = time.time()
        if reading is not None:
            samples.readings.append((now, *reading))
        if now - last_size >= DIR_SAMPLE_PERIOD_S and experiment.is_dir():
            sizes.append((now, folder_bytes(experiment)))
            last_size = now
        if kill_at_trials is not None and trial_folders(experiment) >= kill_at_trials:
            for pid in session_members(driver.pid):
                os.kill(pid, signal.SIGKILL)
            killed = True
            driver.wait()
            break
        if now - started > SWEEP_TIMEOUT_S:
            driver.kill()
            raise TimeoutError(f"the driver ran past {SWEEP_TIMEOUT_S:.0f}s; see {log}")
        time.sleep(SAMPLE_PERIOD_S)
    if not killed and driver.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command[:1])}` exited {driver.returncode}:\n"
            + log.read_text(errors="replace")[-4000:]
        )
    return samples, sizes, killed


def result_rows(experiment: Path) -> Iterator[dict[str, Any]]:
    """Every result every trial reported, the trial folder's name added; cut lines skipped."""
    if not experiment.is_dir():
        return
    for entry in os.scandir(experiment):
        path = Path(entry.path) / "result.json"
        if not entry.is_dir() or not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed driver was writing
            yield {**row, "trial": entry.name}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one time; one ending as another starts do not overlap."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


@dataclass(frozen=True)
class Packing:
    per_gpu: int  # most epochs at once on one GPU id of one node
    per_node: int  # most epochs at once on one node
    one_gpu_share: float  # share of results whose trial held exactly one GPU id


def packing(rows: list[dict[str, Any]]) -> Packing:
    by_gpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
    by_node: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        interval = (row["epoch_started"], row["epoch_ended"])
        by_gpu.setdefault((row["node_id"], row["gpu_ids"]), []).append(interval)
        by_node.setdefault(row["node_id"], []).append(interval)
    one = sum(1 for row in rows if len(row["gpu_ids"].split(",")) == 1 and row["gpu_ids"])
    return Packing(
        per_gpu=max(most_at_once(spans) for spans in by_gpu.values()),
        per_node=max(most_at_once(spans) for spans in by_node.values()),
        one_gpu_share=one / len(rows),
    )


def slopes(
    samples: DriverSamples, finished: list[float], start: int, end: int
) -> tuple[float, float]:
    """CPU seconds and RSS bytes per further finished trial, least squares over readings."""
    import numpy as np

    points = [(bisect.bisect_right(finished, at), cpu, rss) for at, cpu, rss in samples.readings]
    points = [point for point in points if start <= point[0] <= end]
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return math.nan, math.nan
    trials, cpu, rss = (np.asarray(column, dtype=float) for column in zip(*points, strict=True))
    return float(np.polyfit(trials, cpu, 1)[0]), float(np.polyfit(trials, rss, 1)[0])


def bytes_per_trial(sizes: list[tuple[float, int]], finished: list[float], at_least: int) -> float:
    """Bytes per finished trial at the first size reading with ``at_least`` trials finished."""
    for at, size in sizes:
        done = bisect.bisect_right(finished, at)
        if done >= at_least:
            return size / done
    return math.nan


def reading_at(samples: DriverSamples, when: float) -> tuple[float, int]:
    """The driver's (CPU seconds, RSS) at the first reading at or after ``when``."""
    for at, cpu, rss in samples.readings:
        if at >= when:
            return cpu, rss
    _, cpu, rss = samples.readings[-1]
    return cpu, rss


def timed(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started


@register_benchmark(
    "cluster_scale",
    "replayed trials on a simulated multi-GPU cluster: packing, driver CPU and memory, "
    "searcher latency, bytes, leaderboard",
)
def cluster_scale(settings: Settings) -> BenchmarkResult:
    trials = settings.trials or (QUICK_TRIALS if settings.quick else TRIALS)
    workers = QUICK_WORKER_NODES if settings.quick else WORKER_NODES
    gpus = QUICK_GPUS_PER_NODE if settings.quick else GPUS_PER_NODE
    slots = workers * int(gpus / GPU_SHARE)
    storage = settings.workdir / "cluster-scale"
    experiment = storage / "scale"
    log = settings.workdir / "cluster-scale.log"
    worker = NodeSpec(cpus=int(gpus / GPU_SHARE), gpus=gpus)
    # The head holds no CPU: trials run on the worker nodes, the driver beside the head.
    with loopback_cluster(
        NodeSpec(cpus=0), [worker] * workers, {"PYTHONPATH": str(REPO)}
    ) as cluster:
        serve = [sys.executable, "-m", "benchmarks._cluster_driver", "serve-curves"]
        subprocess.run([*serve, cluster.address], cwd=REPO, env=cluster.environment, check=True)
        sweep = ["sweep", "--address", cluster.address, "--name", experiment.name]
        for value in sweep_overrides(storage, trials, slots):
            sweep += ["--set", value]
        print(f"cluster up ({workers} worker nodes, {slots} trial slots); sweeping {trials:,}")
        first, sizes, killed = run_driver(
            sweep, cluster, experiment, log, kill_at_trials=trials // 2
        )
        if not killed:
            raise RuntimeError(f"the sweep ended before {trials // 2} trials started; see {log}")
        print(f"driver killed at {trial_folders(experiment):,} trials started; resuming")
        resume = ["resume", str(experiment), "--address", cluster.address]
        second, more_sizes, _ = run_driver(resume, cluster, experiment, log)
        final_bytes = folder_bytes(experiment)
        # The CI-sized run leaves these out: they take longer than the sweep at that size.
        leaderboard_s = report_s = None
        if not settings.quick:
            cxrtune = str(Path(sys.executable).with_name("cxrtune"))
            leaderboard_s = timed([cxrtune, "leaderboard", str(experiment)], cluster.environment)
            report_s = timed([cxrtune, "report", str(experiment)], cluster.environment)
    print(f"sweep done: {trial_folders(experiment):,} trial folders; measuring the searcher")
    sizes_asked = QUICK_LATENCY_SIZES if settings.quick else LATENCY_SIZES
    latency = measure_searcher_latency(
        [size for size in sizes_asked if size <= trials] or [trials],
        overrides=[
            value for value in sweep_overrides(storage, trials, slots) if is_search_key(value)
        ],
    )
    recorded = list(result_rows(experiment))
    # Trials the killed driver ran but its last snapshot lacked: resume sets them aside and
    # the sweep does not count them, but they ran, and the first driver did their work.
    set_aside = list(result_rows(experiment / UNRECORDED_TRIALS_DIR))
    return summarise(
        trials=trials,
        slots=slots,
        rows=[*recorded, *set_aside],
        finished=finish_times([*recorded, *set_aside]),
        recorded=len(group_by_trial(recorded)),
        drivers=(first, second),
        sizes=[*sizes, *more_sizes, (time.time(), final_bytes)],
        leaderboard_s=leaderboard_s,
        report_s=report_s,
        latency=latency,
        quick=settings.quick,
    )


def finish_times(rows: list[dict[str, Any]]) -> list[float]:
    """When each trial reported its last epoch, in order."""
    return sorted(
        max(row["epoch_ended"] for row in trial_rows)
        for trial_rows in group_by_trial(rows).values()
    )


def group_by_trial(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    trials: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        trials.setdefault(row["trial"], []).append(row)
    return trials


def summarise(
    *,
    trials: int,
    slots: int,
    rows: list[dict[str, Any]],
    finished: list[float],
    recorded: int,
    drivers: tuple[DriverSamples, DriverSamples],
    sizes: list[tuple[float, int]],
    leaderboard_s: float | None,
    report_s: float | None,
    latency: SearcherLatency,
    quick: bool,
) -> BenchmarkResult:
    first, second = drivers
    early = min(EARLY, trials // 4)
    half = trials // 2
    cpu_early, rss_early = reading_at(first, finished[early - 1])
    cpu_total = first.readings[-1][1] + second.readings[-1][1]
    # At the last trial's end: after it the driver builds the leaderboard, whose memory
    # is not the trials'.
    _, rss_end = reading_at(second, finished[-1])
    # The first driver ran without a break from trial ``early`` to its kill near ``half``.
    cpu_slope, rss_slope = slopes(first, finished, early, half)
    # NaN when the first driver saw too few trials end past ``early`` to fit a line.
    sloped = math.isfinite(cpu_slope) and math.isfinite(rss_slope)
    no_slope = f"too few trials ended in the first driver after trial {early:,} for a slope"
    placement = packing(rows)
    epochs = len({(row["trial"], row["epoch"]) for row in rows})
    ideal_s = epochs * EPOCH_SECONDS / slots
    wall_s = max(row["epoch_ended"] for row in rows) - min(row["epoch_started"] for row in rows)
    ended = recorded
    per_node = slots // max(1, len({row["node_id"] for row in rows}))
    bytes_half = bytes_per_trial(sizes, finished, at_least=half // 2)
    bytes_end = sizes[-1][1] / trials
    rows_out = [
        Row(
            case="packing: trials at once per GPU id",
            figure=placement.per_gpu,
            figure_kind="count",
            goal=Goal("==", int(1 / GPU_SHARE)),
            candidate=Side("replayed sweep", "trials", [placement.per_gpu]),
            notes=f"{placement.one_gpu_share:.0%} of epochs saw exactly one GPU id",
            extra={"one_gpu_share": placement.one_gpu_share},
        ),
        Row(
            case="packing: trials at once per node",
            figure=placement.per_node,
            figure_kind="count",
            goal=Goal("==", per_node),
            candidate=Side("replayed sweep", "trials", [placement.per_node]),
        ),
        Row(
            case="resume: trials at the end",
            figure=ended,
            figure_kind="count",
            goal=Goal("==", trials),
            candidate=Side("killed at half, resumed", "trials", [ended]),
        ),
        Row(
            case=f"driver CPU per trial at {early:,} trials",
            figure=cpu_early / early,
            figure_kind="seconds",
            goal=CPU_GOAL,
            candidate=Side("cxrtune sweep", "s/trial", [cpu_early / early]),
            notes="start-up (imports, data, Ray) included",
        ),
        Row(
            case=f"driver CPU per trial at {trials:,} trials",
            figure=cpu_total / trials,
            figure_kind="seconds",
            goal=CPU_GOAL,
            candidate=Side("sweep + resume", "s/trial", [cpu_total / trials]),
            notes=(
                f"{cpu_slope:.3f}s per further trial from trial {early:,}" if sloped else no_slope
            )
            + f"; wall {wall_s:.0f}s against an ideal {ideal_s:.0f}s, "
            f"{(wall_s - ideal_s) / trials:.3f}s per trial over it",
            extra={"wall_s": wall_s, "ideal_s": ideal_s}
            | ({"marginal_s": cpu_slope} if sloped else {}),
        ),
        Row(
            # The driver's work per result bounds the trials it keeps up with: results
            # arrive at (trials at once) / (epoch length) per second.
            case="driver CPU per reported epoch",
            figure=cpu_total / epochs,
            figure_kind="seconds",
            goal=None,
            candidate=Side("sweep + resume", "s/epoch", [cpu_total / epochs]),
            notes=f"{epochs:,} epochs; one driver core keeps up with about "
            f"{REAL_EPOCH_S / (cpu_total / epochs):,.0f} trials at once at "
            f"{REAL_EPOCH_S:.0f} s epochs",
        ),
        Row(
            case=f"driver memory growth, trial {early:,} to {trials:,}",
            figure=(rss_end - rss_early) / 2**20,
            figure_kind="MB",
            goal=MEMORY_GOAL_MB,
            candidate=Side(f"RSS at trial {trials:,}", "MB", [rss_end / 2**20]),
            baseline=Side(f"RSS at trial {early:,}", "MB", [rss_early / 2**20]),
            notes=(
                f"{rss_slope * 1000 / 2**20:.1f} MB per 1,000 trials in one driver"
                if sloped
                else no_slope
            ),
            extra={"mb_per_1000_trials": rss_slope * 1000 / 2**20} if sloped else {},
        ),
        Row(
            case="experiment dir bytes per trial: end / half-way",
            figure=bytes_end / bytes_half,
            figure_kind="ratio (end / half-way)",
            goal=Goal("<=", 1.5),
            candidate=Side("at the end", "KB/trial", [bytes_end / 1024]),
            baseline=Side("half-way", "KB/trial", [bytes_half / 1024]),
            notes="about 1 when bytes grow linearly in trials",
        ),
    ]
    largest = latency.sizes[-1]
    rows_out.append(
        Row(
            case=f"searcher ask + tell p95 at {largest.study_size:,} trials",
            figure=largest.ask_tell_p95_s,
            figure_kind="seconds",
            goal=ASK_TELL_GOAL_S,
            candidate=Side("ask + tell p95", "s", [largest.ask_tell_p95_s]),
            notes="; ".join(
                f"{size.study_size:,}: p50 {size.ask_tell_p50_s * 1000:.0f} ms, "
                f"p95 {size.ask_tell_p95_s * 1000:.0f} ms"
                for size in latency.sizes
            ),
            extra={"sizes": [vars(size) for size in latency.sizes]},
        )
    )
    for case, seconds, goal in (
        ("cxrtune leaderboard", leaderboard_s, LEADERBOARD_GOAL_S),
        ("cxrtune report", report_s, REPORT_GOAL_S),
    ):
        if seconds is not None:
            rows_out.append(
                Row(
                    case=f"{case} on {trials:,} trials",
                    figure=seconds,
                    figure_kind="seconds",
                    goal=goal,
                    candidate=Side(case, "s", [seconds]),
                )
            )
    if not quick:
        plot(drivers, finished, latency, PLOT)
    return BenchmarkResult(
        rows=rows_out,
        details={
            "trials": trials,
            "slots": slots,
            "epoch_seconds": EPOCH_SECONDS,
            "driver_readings": [first.readings, second.readings],
            "finished_at": finished,
            "experiment_bytes": sizes,
            "searcher_latency": latency.to_json(),
        },
    )


def plot(
    drivers: tuple[DriverSamples, DriverSamples],
    finished: list[float],
    latency: SearcherLatency,
    path: Path,
) -> None:
    """Driver memory against trials finished, and the searcher's ask + tell against study size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (memory, timing) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for samples, label in zip(drivers, ("cxrtune sweep (killed)", "cxrtune resume"), strict=True):
        done = [bisect.bisect_right(finished, at) for at, _, _ in samples.readings]
        memory.plot(done, [rss / 2**20 for _, _, rss in samples.readings], label=label)
    memory.set(xlabel="trials finished", ylabel="driver RSS (MB)", title="Driver memory")
    memory.set_ylim(bottom=0)
    memory.legend()
    series = np.asarray(latency.series(), dtype=float)
    both = series[:, 1] + series[:, 2]
    timing.scatter(series[:, 0], both * 1000, s=2, alpha=0.2, label="one trial")
    window = 100
    if len(both) >= window:
        p95 = [np.percentile(both[i : i + window], 95) for i in range(0, len(both) - window + 1)]
        timing.plot(series[window - 1 :, 0], np.asarray(p95) * 1000, color="C1", label="p95 of 100")
    timing.axhline(ASK_TELL_GOAL_S.threshold * 1000, color="grey", linestyle="--", label="goal")
    timing.set(xlabel="trials in the study", ylabel="ask + tell (ms)", title="Searcher latency")
    timing.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
