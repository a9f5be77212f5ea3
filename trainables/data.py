"""Dataset ingest and cache: an image folder becomes one uint8 array, once.

A dataset folder in ImageFolder layout (class = top folder, images anywhere
below it) is decoded into ``N x 1 x H x W`` uint8 at the sweep's resolution,
with labels, class names and source paths. The result is cached on disk under
a fingerprint of the file list, sizes, mtimes and resolution, written
atomically, and reused by every later sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Bump when decoding changes, so caches written by older code are not reused.
CACHE_FORMAT_VERSION = 1

Progress = Callable[[int, int], None]


class DataError(ValueError):
    """The dataset cannot be used; the message names the files and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    """A decoded dataset: images ``N x 1 x H x W`` uint8, integer labels, names, paths."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # relative to the dataset root, POSIX separators

    def __post_init__(self) -> None:
        count = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != count or self.images.shape[1] != 1:
            raise ValueError(
                f"images must be N x 1 x H x W with N = {count}, got {self.images.shape}"
            )
        if len(self.paths) != count:
            raise ValueError(f"{len(self.paths)} paths for {count} images")

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts, strict=True)}


def default_cache_dir() -> Path:
    """``$CXRTUNE_CACHE_DIR``, else ``~/.cache/cxrtune``."""
    configured = os.environ.get("CXRTUNE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "cxrtune"


def find_image_files(root: Path) -> list[tuple[str, Path]]:
    """``(class, file)`` for every image under ``root/<class>/``, sorted; hidden entries skipped.

    An empty class folder or fewer than two classes is a ``DataError``.
    """
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    class_dirs = sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if len(class_dirs) < 2:
        found = [entry.name for entry in class_dirs]
        raise DataError(
            f"{root} must hold one folder per class (at least 2), found {len(found)}: {found}"
        )
    files: list[tuple[str, Path]] = []
    empty: list[str] = []
    for class_dir in class_dirs:
        images = sorted(
            path
            for path in class_dir.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not images:
            empty.append(class_dir.name)
        files.extend((class_dir.name, path) for path in images)
    if empty:
        raise DataError(f"class folder(s) with no PNG/JPEG images under {root}: {empty}")
    return files


def fingerprint(root: Path, files: Sequence[tuple[str, Path]], image_size: int) -> str:
    """A key that changes when a file is added, removed, resized or touched, or the size changes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_FORMAT_VERSION, "size": image_size}).encode())
    for class_name, path in files:
        stat = path.stat()
        relative = path.relative_to(root).as_posix()
        digest.update(f"{class_name}\0{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """Read any PIL image as 8-bit grayscale ``image_size x image_size``.

    EXIF rotation is applied; transparency is composited on black (the film
    background); 16-bit and float images are stretched to their own range rather
    than clipped, since X-ray PNGs often use only the low 12 bits.
    """
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.width == 0 or image.height == 0:
        raise DataError(f"{path}: image has zero size")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    gray = image.convert("L")
    resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _decode_all(
    files: Sequence[tuple[str, Path]], image_size: int, progress: Progress | None
) -> np.ndarray:
    """Decode every file in parallel threads (PIL releases the GIL); list every bad file."""
    images = np.empty((len(files), 1, image_size, image_size), dtype=np.uint8)
    errors: list[str] = []

    def decode(index: int) -> None:
        path = files[index][1]
        try:
            images[index, 0] = decode_image(path, image_size)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            errors.append(f"{path}: {error}")

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(decode, range(len(files))), start=1):
            if progress is not None:
                progress(done, len(files))
    if errors:
        listing = "\n  ".join(sorted(errors))
        raise DataError(f"{len(errors)} image(s) could not be read:\n  {listing}")
    return images


def load_image_folder(
    root: str | Path,
    image_size: int,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[Dataset, Path]:
    """Decode ``root`` (ImageFolder layout) at ``image_size``, or reuse its cache.

    Returns the dataset and the cache file it was read from or written to.
    """
    root = Path(root).expanduser().resolve()
    files = find_image_files(root)
    cache_dir = (cache_dir or default_cache_dir()) / "datasets"
    cache_path = cache_dir / f"{fingerprint(root, files, image_size)}.npz"
    if cache_path.is_file():
        return read_cache(cache_path), cache_path

    class_names = tuple(sorted({class_name for class_name, _ in files}))
    label_of = {name: index for index, name in enumerate(class_names)}
    dataset = Dataset(
        images=_decode_all(files, image_size, progress),
        labels=np.array([label_of[class_name] for class_name, _ in files], dtype=np.int64),
        class_names=class_names,
        paths=tuple(path.relative_to(root).as_posix() for _, path in files),
    )
    write_cache(dataset, cache_path)
    return dataset, cache_path


def write_cache(dataset: Dataset, cache_path: Path) -> None:
    """Write ``dataset`` to ``cache_path`` atomically: readers see no file or the whole file."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(
                stream,
                images=dataset.images,
                labels=dataset.labels,
                class_names=np.array(dataset.class_names),
                paths=np.array(dataset.paths),
            )
        os.replace(temporary, cache_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_cache(cache_path: Path) -> Dataset:
    """Read a dataset cache written by ``write_cache``."""
    with np.load(cache_path, allow_pickle=False) as arrays:
        return Dataset(
            images=arrays["images"],
            labels=arrays["labels"],
            class_names=tuple(str(name) for name in arrays["class_names"]),
            paths=tuple(str(path) for path in arrays["paths"]),
        )


def _normalise_class_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def find_positive_class(class_names: Sequence[str], positive_class: str) -> int:
    """Index of the class matching ``positive_class``, case- and punctuation-insensitively.

    ``COVID`` matches ``COVID``, ``covid``, ``COVID-19`` and ``covid19``: an exact
    match wins, else a name that is the wanted one followed by digits. No match, or
    more than one, is a ``DataError`` listing the classes.
    """
    wanted = _normalise_class_name(positive_class)
    normalised = [_normalise_class_name(name) for name in class_names]
    exact = [index for index, name in enumerate(normalised) if name == wanted]
    if len(exact) == 1:
        return exact[0]
    versioned = [
        index
        for index, name in enumerate(normalised)
        if name.startswith(wanted) and name[len(wanted) :].isdigit()
    ]
    if len(exact) == 0 and len(versioned) == 1:
        return versioned[0]
    matches = [class_names[index] for index in exact or versioned]
    problem = "several classes match" if matches else "no class matches"
    raise DataError(
        f"{problem} the positive class {positive_class!r} {matches or ''}; "
        f"classes: {list(class_names)}. Set `positive_class` in the sweep file."
    )
