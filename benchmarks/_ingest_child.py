"""One timed decode of a folder of PNGs in a fresh process, for ``ingest_decode``.

``python -m benchmarks._ingest_child (cxrtune|plain) ROOT SIZE CACHE_DIR`` prints one JSON
line: seconds, images, and memory in MiB: resident before the decode (after imports), the
peak (``VmHWM``: unlike ``ru_maxrss`` it starts afresh at exec, so the parent's size does
not count) and the output array. A fresh process per run keeps the peak honest.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MIB = 2**20


def resident_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / MIB


def peak_resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plain_loop(root: Path, size: int) -> np.ndarray:
    """The straightforward recipe: one file after another, float stretch, PIL resize."""
    paths = sorted(root.rglob("*.png"))
    images = np.zeros((len(paths), 1, size, size), dtype=np.uint8)
    for index, path in enumerate(paths):
        with Image.open(path) as opened:
            values = np.asarray(opened, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255.0 if high > low else values * 0
        gray = Image.fromarray(scaled.round().astype(np.uint8))
        images[index, 0] = np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR))
    return images


def main(argv: list[str]) -> None:
    side, root, size, cache_dir = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    from cxrtune.trainables.data import ingest

    before = resident_mib()
    started = time.perf_counter()
    if side == "cxrtune":
        images = ingest(root, size, cache_dir=cache_dir).dataset.images
    else:
        images = plain_loop(root, size)
    seconds = time.perf_counter() - started
    peak = peak_resident_mib()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "images": len(images),
                "before_mib": before,
                "peak_mib": peak,
                "output_mib": images.nbytes / MIB,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
