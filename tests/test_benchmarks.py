"""The benchmark suite's smoke run: every benchmark reports, with finite numbers.

Benchmarks are not timed tests: nothing here asserts a speed, a ratio or a goal
met, only that ``python -m benchmarks.run --quick`` runs and writes the results
it promises.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("benchmark-results")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    (path,) = out.glob("*.json")
    return dict(json.loads(path.read_text()))


def numbers(value: Any, where: str = "results") -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{where}[{index}]")


def test_every_registered_benchmark_is_in_the_results(quick_results: dict[str, Any]) -> None:
    from benchmarks.run import BENCHMARKS

    assert set(quick_results["benchmarks"]) == set(BENCHMARKS)


def test_each_benchmark_ran_or_says_why_not(quick_results: dict[str, Any]) -> None:
    for name, entry in quick_results["benchmarks"].items():
        assert "error" not in entry, f"{name}: {entry.get('error')}"
        if "skipped" in entry:
            assert name == "gpu_throughput" and entry["skipped"] == "no GPU"
        else:
            assert entry["rows"], name


def test_every_number_in_the_results_is_finite(quick_results: dict[str, Any]) -> None:
    found = list(numbers(quick_results))
    assert found
    for where, value in found:
        assert math.isfinite(value), where


def test_every_row_has_its_repeats_median_figure_and_goal(quick_results: dict[str, Any]) -> None:
    for name, entry in quick_results["benchmarks"].items():
        for row in entry.get("rows", []):
            sides = [row["candidate"]] + ([row["baseline"]] if row["baseline"] else [])
            for side in sides:
                assert side["repeats"], f"{name} {row['case']}"
                assert side["median"] == pytest.approx(statistics.median(side["repeats"]))
            assert isinstance(row["figure"], float | int)
            assert row["met"] is None if row["goal"] is None else isinstance(row["met"], bool)


def test_the_results_record_the_machine_and_the_load(quick_results: dict[str, Any]) -> None:
    machine = quick_results["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "torchvision", "ray"):
        assert machine[key], key
    assert len(quick_results["load_average"]["start"]) == 3
    assert len(quick_results["load_average"]["end"]) == 3
    assert quick_results["mode"] == "quick"


def test_the_simulated_cluster_packs_four_trials_per_gpu_and_ends_with_every_trial(
    quick_results: dict[str, Any],
) -> None:
    """The CI-sized cluster_scale run: two nodes, a few hundred replayed trials.

    Trials of ``gpus: 0.25`` on a node that declares 2 GPUs run 8 at once, 4 on each
    GPU id, each seeing one id; the driver is killed half-way and ``cxrtune resume``
    ends the sweep with exactly the trials asked for.
    """
    from benchmarks.cluster_scale import QUICK_TRIALS

    entry = quick_results["benchmarks"]["cluster_scale"]
    rows = {row["case"]: row for row in entry["rows"]}
    per_gpu = rows["packing: trials at once per GPU id"]
    assert per_gpu["figure"] == 4 and per_gpu["met"]
    assert per_gpu["one_gpu_share"] == 1.0
    assert rows["packing: trials at once per node"]["figure"] == 8
    resumed = rows["resume: trials at the end"]
    assert resumed["figure"] == QUICK_TRIALS == entry["details"]["trials"]
