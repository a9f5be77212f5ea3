"""quickstart_wall_time: the README's main command, end to end, split into its phases.

``cxrtune sweep sweeps/quickstart.yaml`` runs in a fresh process with an empty
dataset cache (so the synthetic set is generated and decoded, as on a first
run) and its results in scratch space. The figure is the wall time of that
process; the split comes from ``benchmarks._quickstart_child``. Nothing to take
a ratio against: the goal is in seconds, and the sweep runs once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._harness import BenchmarkResult, Goal, Row, Settings, Side, register_benchmark

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILE = "sweeps/quickstart.yaml"
GOAL = Goal("<", 300.0)
QUICK_OVERRIDES = ["num_samples=3", "max_epochs=1"]
PHASES = ("ingest", "ray_start", "trials", "analysis")


@register_benchmark(
    "quickstart_wall_time",
    f"wall time of `cxrtune sweep {SWEEP_FILE}` (cold dataset cache), split into phases",
)
def quickstart_wall_time(settings: Settings) -> BenchmarkResult:
    scratch = settings.workdir / "quickstart"
    scratch.mkdir(parents=True)
    overrides = [f"storage_path={scratch / 'results'}"]
    overrides += QUICK_OVERRIDES if settings.quick else []
    arguments = ["sweep", SWEEP_FILE, "--name", "quickstart-benchmark"]
    for override in overrides:
        arguments += ["--set", override]
    timings_path = scratch / "timings.json"
    log_path = scratch / "sweep.log"
    environment = {**os.environ, "CXRTUNE_CACHE_DIR": str(scratch / "cache")}
    started = time.perf_counter()
    with log_path.open("w") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks._quickstart_child", str(timings_path), *arguments],
            cwd=REPO,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"the quickstart sweep exited with {completed.returncode}:\n{tail}")
    seconds = json.loads(timings_path.read_text())["seconds"]
    split = {phase: seconds[phase] for phase in PHASES}
    # Interpreter start, imports, the experiment dir, building the Tuner, Ray's shutdown.
    split["other"] = wall - sum(split.values())
    command = " ".join(["cxrtune", *arguments[:2], *(f"--set {o}" for o in overrides[1:])])
    return BenchmarkResult(
        rows=[
            Row(
                case="end to end",
                figure=wall,
                figure_kind="seconds",
                goal=GOAL,
                candidate=Side(command, "s", [wall]),
                notes="split: " + ", ".join(f"{key} {value:.1f}s" for key, value in split.items()),
                extra={"split_s": split},
            )
        ],
        details={"command": command, "cold_dataset_cache": True, "split_s": split},
    )
