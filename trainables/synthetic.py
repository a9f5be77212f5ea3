"""Embedded SYNTHETIC chest-X-ray-like dataset for offline runs, tests and demos.

This module owns the generator of a four-class, clearly labelled synthetic dataset written as
8-bit grayscale PNGs in ImageFolder layout (``<root>/<class>/<class>_<index>.png``) plus a
``SYNTHETIC.txt`` marker at the root. The images are cartoons of a frontal chest radiograph
(thorax, lungs, mediastinum, heart, ribs) and are not real patient data. Each class differs by a
local lung pattern only; per-image brightness, contrast and gamma jitter keep global intensity
statistics uninformative, so a model has to look at the pattern.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

__all__ = ["CLASS_NAMES", "MARKER_FILE", "class_counts", "render_image", "write_synthetic_dataset"]

CLASS_NAMES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral_Pneumonia")
# COVID is the minority class, echoing the imbalance of the COVID-19 Radiography Database.
CLASS_FRACTIONS: dict[str, float] = {
    "COVID": 0.10,
    "Lung_Opacity": 0.30,
    "Normal": 0.40,
    "Viral_Pneumonia": 0.20,
}
MARKER_FILE = "SYNTHETIC.txt"

_MIN_IMAGES = 20


def class_counts(n: int) -> dict[str, int]:
    """Split n images over the classes by CLASS_FRACTIONS (largest remainder, exact sum)."""
    if n < _MIN_IMAGES:
        raise ValueError(f"need at least {_MIN_IMAGES} images so every class is present, got {n}")
    # Exact rational quotas avoid float floors such as 0.1 * 30 -> 2.9999.
    quotas = {
        name: n * Fraction(CLASS_FRACTIONS[name]).limit_denominator(10_000) for name in CLASS_NAMES
    }
    counts = {name: int(quota) for name, quota in quotas.items()}
    by_remainder = sorted(CLASS_NAMES, key=lambda name: quotas[name] - counts[name], reverse=True)
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


@dataclass(frozen=True)
class _Anatomy:
    """Where the jittered lungs landed, in image coordinates spanning [-1, 1]."""

    scale: float
    lung_xs: tuple[float, float]
    lung_y: float
    lung_half_width: float
    lung_half_height: float


def _sigmoid_edge(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Smooth step that is 1 inside (negative distance) and 0 outside."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / softness, -50.0, 50.0)))


def _soft_ellipse(
    xx: np.ndarray,
    yy: np.ndarray,
    centre: tuple[float, float],
    axes: tuple[float, float],
    softness: float,
) -> np.ndarray:
    """Ellipse mask in [0, 1]; softness is the edge width as a fraction of the radius."""
    radius = np.hypot((xx - centre[0]) / axes[0], (yy - centre[1]) / axes[1])
    return _sigmoid_edge(radius - 1.0, softness)


def _draw_segments(size: int, starts: np.ndarray, ends: np.ndarray, width: float) -> np.ndarray:
    """Line segments with unit peak and Gaussian profile of the given width (image units)."""
    # Splatting points along each segment and blurring once is far cheaper than a distance
    # field per segment, and the blur hides the nearest-pixel rounding.
    width_px = width * size / 2
    lengths_px = np.hypot(*(ends - starts).T) * size / 2
    steps = max(2, int(np.ceil(lengths_px.max() * 2)))
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    points = (starts[:, None, :] + t * (ends - starts)[:, None, :] + 1.0) / 2 * size - 0.5
    cols = np.rint(points[..., 0]).astype(int).ravel()
    rows = np.rint(points[..., 1]).astype(int).ravel()
    weights = np.repeat(lengths_px / steps, steps)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    canvas = np.bincount(
        rows[inside] * size + cols[inside], weights[inside], minlength=size * size
    ).reshape(size, size)
    return gaussian_filter(canvas, width_px) * np.sqrt(2 * np.pi) * width_px


def _render_anatomy(
    xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, _Anatomy]:
    """Normal chest (image, lung mask) with jittered pose, before class pattern and exposure."""
    size = xx.shape[0]
    scale = rng.uniform(0.88, 1.05)
    cx, cy = rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05)
    anatomy = _Anatomy(
        scale=scale,
        lung_xs=(cx - 0.38 * scale, cx + 0.38 * scale),
        lung_y=cy - 0.06 * scale,
        lung_half_width=0.28 * scale,
        lung_half_height=0.6 * scale,
    )

    image = np.full(xx.shape, 0.06)
    thorax = _soft_ellipse(xx, yy, (cx, cy + 0.1 * scale), (0.88 * scale, 1.02 * scale), 0.12)
    image += 0.5 * thorax

    # Lungs taper towards the apex and widen at the costophrenic angles.
    rel_y = (yy - anatomy.lung_y) / anatomy.lung_half_height
    taper = np.clip(0.92 + 0.15 * rel_y, 0.72, 1.05)
    lung_mask = np.zeros_like(xx)
    for lung_x in anatomy.lung_xs:
        radius = np.hypot((xx - lung_x) / (anatomy.lung_half_width * taper), rel_y)
        lung_mask += _sigmoid_edge(radius - 1.0, 0.07)
    # The heart sits in front of the lower image-right lung and hides most of it.
    heart = _soft_ellipse(
        xx, yy, (cx + 0.13 * scale, cy + 0.32 * scale), (0.27 * scale, 0.21 * scale), 0.1
    )
    lung_mask = np.clip(lung_mask, 0.0, 1.0) * (1.0 - 0.85 * heart)
    image -= rng.uniform(0.28, 0.36) * lung_mask

    # Posterior ribs leave the spine rising slightly and then sweep down laterally.
    lateral = np.abs(xx - cx) / scale
    rib_phase = (yy - cy) / scale + 0.3 * lateral - 1.0 * lateral**2
    rib_wave = np.cos(2 * np.pi * rng.uniform(5.5, 6.5) * rib_phase + rng.uniform(0, 2 * np.pi))
    image += 0.06 * ((0.5 + 0.5 * rib_wave) ** 4) * lung_mask

    mediastinum = _sigmoid_edge(np.abs(xx - cx) - 0.11 * scale, 0.02)
    spine = _sigmoid_edge(np.abs(xx - cx) - 0.045 * scale, 0.01)
    image += (np.maximum(0.12 * mediastinum, 0.17 * heart) + 0.06 * spine) * thorax
    clavicle_starts = np.array(
        [[cx - 0.07 * scale, cy - 0.6 * scale], [cx + 0.07 * scale, cy - 0.6 * scale]]
    )
    clavicle_ends = np.array(
        [[cx - 0.55 * scale, cy - 0.74 * scale], [cx + 0.55 * scale, cy - 0.74 * scale]]
    )
    image += 0.08 * _draw_segments(size, clavicle_starts, clavicle_ends, 0.03 * scale)

    texture = gaussian_filter(rng.standard_normal(xx.shape), sigma=size / 24)
    image += 0.035 * texture / (texture.std() + 1e-9)
    return image, lung_mask, anatomy


def _class_pattern(
    class_name: str, xx: np.ndarray, yy: np.ndarray, anatomy: _Anatomy, rng: np.random.Generator
) -> np.ndarray:
    """Additive opacity that carries the class signal; the caller confines it to the lungs."""
    pattern = np.zeros_like(xx)
    half_width, half_height = anatomy.lung_half_width, anatomy.lung_half_height
    if class_name == "COVID":
        # Ground glass: soft, hazy, bilateral, peripheral and in the lower zones.
        for lung_x, side in zip(anatomy.lung_xs, (-1.0, 1.0), strict=True):
            for _ in range(rng.integers(1, 3)):
                px = lung_x + side * half_width * rng.uniform(0.35, 0.7)
                py = anatomy.lung_y + half_height * rng.uniform(0.2, 0.6)
                sigma = rng.uniform(0.1, 0.15) * anatomy.scale
                blob = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma**2))
                pattern += rng.uniform(0.16, 0.22) * blob
    elif class_name == "Viral_Pneumonia":
        # Interstitial reticulation: many short thin streaks of random direction in both lungs.
        starts, ends = [], []
        for lung_x in anatomy.lung_xs:
            count = rng.integers(14, 22)
            centres = np.stack(
                [
                    lung_x + rng.uniform(-0.8, 0.8, count) * half_width,
                    anatomy.lung_y + rng.uniform(-0.75, 0.8, count) * half_height,
                ],
                axis=1,
            )
            angles = rng.uniform(0, np.pi, count)
            half_lengths = rng.uniform(0.06, 0.14, count)[:, None] * anatomy.scale
            half_vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * half_lengths
            starts.append(centres - half_vectors)
            ends.append(centres + half_vectors)
        streaks = _draw_segments(xx.shape[0], np.concatenate(starts), np.concatenate(ends), 0.024)
        pattern += rng.uniform(0.12, 0.16) * np.minimum(streaks, 1.5)
    elif class_name == "Lung_Opacity":
        # Consolidation: a single dense, sharper-edged focus anywhere in one lung.
        lung_x = anatomy.lung_xs[rng.integers(0, 2)]
        px = lung_x + rng.uniform(-0.5, 0.5) * half_width
        py = anatomy.lung_y + rng.uniform(-0.6, 0.6) * half_height
        radius = rng.uniform(0.09, 0.16) * anatomy.scale
        axes = (radius * rng.uniform(0.8, 1.25), radius)
        pattern += rng.uniform(0.32, 0.4) * _soft_ellipse(xx, yy, (px, py), axes, 0.14)
    return pattern


def render_image(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one synthetic radiograph of class_name as a uint8 (size, size) array."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    xx, yy = np.meshgrid(coords, coords)
    image, lung_mask, anatomy = _render_anatomy(xx, yy, rng)
    image += _class_pattern(class_name, xx, yy, anatomy, rng) * lung_mask

    # Exposure jitter large enough that the class patterns cannot be read off mean or spread.
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-0.09, 0.09)
    image = (image - 0.35) * contrast + 0.35 + brightness
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    image += rng.normal(0.0, rng.uniform(0.01, 0.03), size=image.shape)
    # A slight blur makes the pixel noise read as film grain rather than salt and pepper.
    image = gaussian_filter(image, sigma=0.5 * size / 128)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    n: int = 1200,
    size: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write n synthetic PNGs in ImageFolder layout plus a marker; return counts per class."""
    out_path = Path(out_dir)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(
            f"refusing to write the synthetic dataset into {out_path}: it already exists and is "
            "not empty; choose a new directory or remove it first"
        )
    counts = class_counts(n)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename at the end so a crash never leaves a dataset that
    # looks complete at out_dir.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        # One child seed per image: any image can be regenerated without replaying the others.
        image_seeds = iter(np.random.SeedSequence(seed).spawn(n))
        done = 0
        for class_name in CLASS_NAMES:
            class_dir = staging / class_name
            class_dir.mkdir()
            for index in range(counts[class_name]):
                pixels = render_image(class_name, size, np.random.default_rng(next(image_seeds)))
                Image.fromarray(pixels).save(class_dir / f"{class_name}_{index:05d}.png")
                done += 1
                if progress is not None:
                    progress(done, n)
        (staging / MARKER_FILE).write_text(_marker_text(n, size, seed, counts), encoding="utf-8")
        if out_path.exists():
            out_path.rmdir()
        os.replace(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def _marker_text(n: int, size: int, seed: int, counts: dict[str, int]) -> str:
    """Human-readable provenance note written at the dataset root."""
    lines = [
        "SYNTHETIC DATA - NOT REAL CHEST X-RAYS, NOT PATIENT DATA, NOT FOR CLINICAL USE.",
        "",
        "Generated by cxrtune.trainables.synthetic.write_synthetic_dataset",
        f"n={n} size={size} seed={seed}",
        "counts: " + ", ".join(f"{name}={counts[name]}" for name in CLASS_NAMES),
        "",
        "Each image is a procedural cartoon of a frontal chest radiograph (thorax, lungs,",
        "mediastinum, heart, ribs, soft-tissue texture, noise) with per-image jitter of position,",
        "scale, brightness, contrast and gamma. Classes differ only by a local lung pattern:",
        "COVID: bilateral peripheral lower-zone ground-glass patches;",
        "Viral_Pneumonia: diffuse bilateral interstitial streaks;",
        "Lung_Opacity: one focal dense consolidation; Normal: clear lungs.",
    ]
    return "\n".join(lines) + "\n"
