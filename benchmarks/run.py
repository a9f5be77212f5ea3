"""Run the suite: ``python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR]``.

Prints a table and writes ``<out>/<hostname>-<YYYY-MM-DD>.json`` (``-quick`` and
``-partial`` are appended for ``--quick`` and ``--only`` runs, so a smoke run
never replaces a full one): the machine, the load before and after, and per
benchmark every repeat, the medians, the figure, its goal and whether it is met.
Exit code 0 when every benchmark ran (met or not), 1 when one raised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

# Imported for their registration; each module is one benchmark.
from benchmarks import (  # noqa: F401
    cluster_scale,
    gpu_throughput,
    ingest_decode,
    input_pipeline,
    memory_concurrent_trials,
    quickstart_wall_time,
    search_efficiency,
    search_efficiency_real,
    trial_overhead,
)
from benchmarks._harness import (
    BENCHMARKS,
    BenchmarkResult,
    Settings,
    get_benchmark,
    import_psutil,
)
from cxrtune.search.ray_environment import use_loopback_ray

# The order the suite runs and reports in; every registered benchmark is in it.
SUITE = (
    "input_pipeline",
    "ingest_decode",
    "trial_overhead",
    "memory_concurrent_trials",
    "search_efficiency",
    "search_efficiency_real",
    "cluster_scale",
    "quickstart_wall_time",
    "gpu_throughput",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LOAD_POLL_S = 20.0
LOAD_WAIT_LIMIT_S = 600.0
REPEATS = 3  # per side, interleaved; --quick runs each side once (a smoke test, not a figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run cxrtune's benchmarks; each figure is a ratio against a baseline "
        "measured in the same run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test sizes, one repeat per side: the suite in about 2 minutes",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"run only these ({', '.join(SUITE)})"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help="trials for the benchmarks that run sweeps of many (cluster_scale: default "
        "10000, 200 with --quick)",
    )
    parser.add_argument(
        "--wait-for-load",
        type=float,
        metavar="LOAD",
        help="first wait (polling every 20 s, at most 10 minutes) until the 1-minute load "
        "average is below LOAD",
    )
    return parser


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, GPU and library versions."""
    import numpy
    import optuna
    import ray
    import torch
    import torchvision

    psutil = import_psutil()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "numpy": numpy.__version__,
    }


def cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the name.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def wait_for_load(threshold: float) -> float:
    """Wait until the 1-minute load average is below ``threshold``; return the seconds waited.

    Gives up after ten minutes and runs anyway: the load is recorded either way.
    """
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold:
        waited = time.monotonic() - started
        if waited >= LOAD_WAIT_LIMIT_S:
            print(f"load still {os.getloadavg()[0]:.2f} after {waited:.0f}s; running anyway")
            break
        print(f"load {os.getloadavg()[0]:.2f} >= {threshold}; waiting {LOAD_POLL_S:.0f}s")
        time.sleep(LOAD_POLL_S)
    return time.monotonic() - started


def results_path(out: Path, quick: bool, partial: bool) -> Path:
    name = f"{socket.gethostname()}-{datetime.date.today():%Y-%m-%d}"
    name += "-quick" if quick else ""
    name += "-partial" if partial else ""
    return out / f"{name}.json"


def run_one(name: str, settings: Settings) -> dict[str, Any]:
    """Run one benchmark; an exception is recorded (and printed), not raised."""
    registered = get_benchmark(name)
    print(f"\n== {name}: {registered.summary}", flush=True)
    entry: dict[str, Any] = {"summary": registered.summary}
    # Other work on the machine moves the figures; each benchmark records what it ran beside.
    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        result: BenchmarkResult = registered.run(settings)
    except Exception as error:
        traceback.print_exc()
        entry["error"] = f"{type(error).__name__}: {error}"
    else:
        if result.skipped:
            entry["skipped"] = result.skipped
        entry["rows"] = [row.to_json() for row in result.rows]
        entry["details"] = result.details
    entry["wall_s"] = time.perf_counter() - started
    entry["load_average_1min"] = {"start": load_at_start, "end": os.getloadavg()[0]}
    return entry


def format_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if unit == "images/s" or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def results_table(benchmarks: dict[str, dict[str, Any]]) -> str:
    """The results as a GitHub-style Markdown table: medians, figure, goal, met."""
    lines = []
    for name, entry in benchmarks.items():
        if "error" in entry or "skipped" in entry:
            reason = entry.get("error") or f"skipped: {entry['skipped']}"
            lines.append([name, "", "", "", reason, "", ""])
            continue
        for row in entry["rows"]:
            baseline, candidate = row["baseline"], row["candidate"]
            figure = format_value(row["figure"])
            if row["censored"]:
                figure = "> " + figure
            met = {True: "yes", False: "NO", None: "-"}[row["met"]]
            lines.append(
                [
                    name,
                    row["case"],
                    ""
                    if baseline is None
                    else f"{format_value(baseline['median'])} {baseline['unit']}",
                    f"{format_value(candidate['median'], candidate['unit'])} {candidate['unit']}",
                    f"{figure} ({row['figure_kind'].split(' ')[0]})",
                    row["goal"] or "",
                    met,
                ]
            )
    headers = ["benchmark", "case", "baseline (median)", "cxrtune (median)", "figure", "goal"]
    return tabulate(lines, headers=[*headers, "met"], tablefmt="github")


def check_finite(value: Any, where: str) -> None:
    """Refuse to write NaN or infinity: JSON cannot hold them and they hide bugs."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_finite(item, f"{where}[{index}]")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    use_loopback_ray()  # before any benchmark brings Ray in
    if set(SUITE) != set(BENCHMARKS):
        raise RuntimeError(f"SUITE {sorted(SUITE)} and the registry {sorted(BENCHMARKS)} differ")
    names = args.only or list(SUITE)
    try:
        for name in names:
            get_benchmark(name)
    except ValueError as error:
        build_parser().error(str(error))

    waited = wait_for_load(args.wait_for_load) if args.wait_for_load is not None else 0.0
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *arguments]),
        "mode": "quick" if args.quick else "full",
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "load_average": {"waited_s": waited, "start": list(os.getloadavg())},
        "benchmarks": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxrtune-benchmarks-") as scratch:
        settings = Settings(
            quick=args.quick,
            repeats=1 if args.quick else REPEATS,
            workdir=Path(scratch),
            cores=os.cpu_count() or 1,
            trials=args.trials,
        )
        for name in names:
            report["benchmarks"][name] = run_one(name, settings)
    report["load_average"]["end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    check_finite(report, "results")

    path = results_path(args.out, args.quick, partial=args.only is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(results_table(report["benchmarks"]))
    print(
        f"\nload average (1 min): {report['load_average']['start'][0]:.2f} at start, "
        f"{report['load_average']['end'][0]:.2f} at end; wall {report['wall_s']:.0f}s"
    )
    print(f"Results written to {path}")
    failed = [name for name, entry in report["benchmarks"].items() if "error" in entry]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
