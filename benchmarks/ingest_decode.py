"""ingest_decode: cxrtune's ingest vs a plain single-threaded PIL loop, images/s and memory.

Two data sets, written once per run in parallel: full-size X-ray PNGs (2,500 x 3,000 px,
16-bit grayscale), and one of the COVID-19 Radiography Database's shape and size (21,165
8-bit PNGs of 299 px in ``<class>/images``). Both sides decode every file to 224 px in a
fresh process (``benchmarks/_ingest_child.py``) that reports its time and peak memory;
cxrtune's side starts with an empty cache, and a last run reads that cache back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import (
    BenchmarkResult,
    Goal,
    Row,
    Settings,
    Side,
    interleave,
    ratio_row,
    register_benchmark,
)

TARGET_SIZE = 224  # pixels per side both sides decode to
LARGE_SHAPE = (3000, 2500)  # rows x columns of the full-size PNGs
LARGE_COUNT = 100
RADIOGRAPHY_CLASSES = {
    "COVID": 3616,
    "Lung_Opacity": 6012,
    "Normal": 10192,
    "Viral Pneumonia": 1345,
}
RADIOGRAPHY_SIZE = 299
QUICK_LARGE_COUNT = 3
QUICK_RADIOGRAPHY_PER_CLASS = 10
SPEEDUP_GOAL = Goal(">=", 1.8)
MEMORY_GOAL = Goal("<", 1024.0)  # MiB of peak memory beyond the output array
FIRST_INGEST_GOAL = Goal("<=", 60.0)  # seconds, the Radiography-sized set
CACHED_READ_GOAL = Goal("<=", 5.0)
REPO = Path(__file__).resolve().parents[1]


def _write_png_batch(jobs: list[tuple[str, int, int, int, int]]) -> None:
    """Write chest-like PNGs: (path, rows, columns, bits, seed) each."""
    from PIL import Image

    for path, rows, columns, bits, seed in jobs:
        rng = np.random.default_rng(seed)
        top = 2**bits - 1
        # A bright body over a dark background, with noise: compresses like a radiograph.
        y, x = np.ogrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]
        body = np.clip(1.2 - (x**2 / 0.6 + y**2 / 0.9), 0, 1)
        noise = rng.normal(0, 0.03, (rows, columns))
        values = np.clip((body * 0.8 + 0.1 + noise) * top, 0, top)
        dtype = np.uint16 if bits > 8 else np.uint8
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(values.astype(dtype)).save(path, compress_level=1)


def write_in_parallel(jobs: list[tuple[str, int, int, int, int]], cores: int) -> None:
    """Write every job once, split over ``cores`` processes."""
    batches = [jobs[start::cores] for start in range(cores)]
    with ProcessPoolExecutor(max_workers=cores) as pool:
        list(pool.map(_write_png_batch, batches))


def run_child(side: str, root: Path, cache_dir: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks._ingest_child",
            side,
            str(root),
            str(TARGET_SIZE),
            str(cache_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured


def images_per_second(runs: list[dict[str, Any]]) -> list[float]:
    return [run["images"] / run["seconds"] for run in runs]


def beyond_output(run: dict[str, Any]) -> float:
    return float(run["peak_mib"] - run["before_mib"] - run["output_mib"])


def compare(
    name: str, root: Path, settings: Settings, repeats: int, result: BenchmarkResult
) -> list[dict[str, Any]]:
    """Plain loop vs cxrtune's first ingest (a fresh cache each run); cxrtune's runs back."""
    caches = iter(range(repeats))

    def candidate() -> dict[str, Any]:
        return run_child("cxrtune", root, settings.workdir / f"{name}-cache-{next(caches)}")

    baseline_runs, candidate_runs = interleave(
        lambda: run_child("plain", root, settings.workdir / "unused"), candidate, repeats
    )
    result.rows.append(
        ratio_row(
            f"{name}: images/s",
            Side("single-threaded PIL loop", "images/s", images_per_second(baseline_runs)),
            Side(
                f"cxrtune ingest ({settings.cores} cores)",
                "images/s",
                images_per_second(candidate_runs),
            ),
            SPEEDUP_GOAL if name == "large" else None,
            notes=f"{candidate_runs[0]['images']} images to {TARGET_SIZE} px, empty cache",
        )
    )
    memory = [beyond_output(run) for run in candidate_runs]
    result.rows.append(
        Row(
            case=f"{name}: peak memory beyond the output array",
            figure=float(np.median(memory)),
            figure_kind="MiB",
            goal=MEMORY_GOAL,
            candidate=Side("cxrtune ingest", "MiB", memory),
            baseline=Side(
                "single-threaded PIL loop", "MiB", [beyond_output(r) for r in baseline_runs]
            ),
            notes=f"output array {candidate_runs[0]['output_mib']:.0f} MiB",
        )
    )
    return candidate_runs


@register_benchmark(
    "ingest_decode",
    "cxrtune ingest vs a single-threaded PIL loop: full-size 16-bit PNGs and a 21k-image set",
)
def ingest_decode(settings: Settings) -> BenchmarkResult:
    import time

    large_count = QUICK_LARGE_COUNT if settings.quick else LARGE_COUNT
    rows, columns = (300, 250) if settings.quick else LARGE_SHAPE
    large_root = settings.workdir / "ingest_decode" / "large"
    # Two classes, as ingest needs: the first image is Normal, the others COVID.
    jobs = [
        (str(large_root / ("Normal" if index == 0 else "COVID") / f"{index:04d}.png"))
        for index in range(large_count)
    ]
    jobs = [(path, rows, columns, 16, index) for index, path in enumerate(jobs)]
    started = time.perf_counter()
    write_in_parallel(jobs, settings.cores)
    large_write_s = time.perf_counter() - started

    per_class = (
        {name: QUICK_RADIOGRAPHY_PER_CLASS for name in RADIOGRAPHY_CLASSES}
        if settings.quick
        else RADIOGRAPHY_CLASSES
    )
    radiography_root = settings.workdir / "ingest_decode" / "radiography"
    paths = [
        radiography_root / name / "images" / f"{name}-{index + 1}.png"
        for name, count in per_class.items()
        for index in range(count)
    ]
    jobs = [
        (str(path), RADIOGRAPHY_SIZE, RADIOGRAPHY_SIZE, 8, LARGE_COUNT + seed)
        for seed, path in enumerate(paths)
    ]
    started = time.perf_counter()
    write_in_parallel(jobs, settings.cores)
    radiography_write_s = time.perf_counter() - started

    result = BenchmarkResult(
        details={
            "large": {"images": large_count, "shape": [rows, columns], "bits": 16},
            "radiography": {"images": len(jobs), "size_px": RADIOGRAPHY_SIZE, "bits": 8},
            "target_size_px": TARGET_SIZE,
            "write_s": {"large": large_write_s, "radiography": radiography_write_s},
            "write_images_per_s": {
                "large": large_count / large_write_s,
                "radiography": len(jobs) / radiography_write_s,
            },
        }
    )
    compare("large", large_root, settings, settings.repeats, result)
    # The big set once per side: a run of each takes about a minute on two cores.
    first = compare("radiography", radiography_root, settings, 1, result)[0]
    result.rows.append(
        Row(
            case="radiography: first ingest",
            figure=first["seconds"],
            figure_kind="seconds",
            goal=None if settings.quick else FIRST_INGEST_GOAL,
            candidate=Side("cxrtune ingest", "seconds", [first["seconds"]]),
        )
    )
    cached = run_child("cxrtune", radiography_root, settings.workdir / "radiography-cache-0")
    result.rows.append(
        Row(
            case="radiography: cached read",
            figure=cached["seconds"],
            figure_kind="seconds",
            goal=None if settings.quick else CACHED_READ_GOAL,
            candidate=Side("cxrtune ingest, cache hit", "seconds", [cached["seconds"]]),
            notes=f"peak memory beyond the output array {beyond_output(cached):.0f} MiB",
        )
    )
    return result
