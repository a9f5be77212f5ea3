"""Dataset ingest and cache: a dataset becomes one uint8 array, once.

A layout (``cxrtune.trainables.layouts``) lists the samples; each image is
decoded to 8-bit grayscale, hashed (to find exact duplicates) and resized to
the sweep's resolution, into ``N x 1 x H x W`` uint8. The decoded set is cached
under a fingerprint of the sample list, file sizes, mtimes and resolution,
written atomically and reused by every later sweep.

Policy is applied after the cache: unreadable files stop the ingest (all listed)
unless skipping is asked for, and an image found under two labels stops it
unless such images are dropped. Nothing from a bad file reaches a trial.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrtune.trainables.atomic import atomic_path
from cxrtune.trainables.dicom import DicomError, read_dicom
from cxrtune.trainables.layouts import (
    Layout,
    LayoutError,
    Listing,
    Sample,
    detect_layout,
    get_layout,
    list_manifest,
)
from cxrtune.trainables.shortcut import ShortcutCheck, check_shortcut

__all__ = [
    "DECODE_ERRORS",
    "DataError",
    "Dataset",
    "IngestReport",
    "contents_in_two_splits",
    "decode_image",
    "default_cache_dir",
    "find_positive_class",
    "ingest",
    "read_cache",
    "read_error_reason",
    "read_gray",
    "resize",
    "write_cache",
]

# Bump when decoding changes, so caches written by older code are not reused.
CACHE_FORMAT_VERSION = 3

Progress = Callable[[int, int], None]
DICOM_MODE = "DICOM"
ORIENTATION_TAG = 0x0112  # EXIF Orientation; 1 = upright


class DataError(ValueError):
    """The dataset cannot be used; the message names the files and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    """Decoded images ``N x 1 x H x W`` uint8, integer labels, and per-image facts."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # relative to the dataset root (or the manifest's folder)
    hashes: tuple[str, ...] = ()  # content hash of the decoded full-size image
    patients: tuple[str, ...] = ()  # "" where unknown
    sources: tuple[str, ...] = ()
    fixed_splits: tuple[str, ...] = ()  # a split the dataset itself fixes, else ""

    def __post_init__(self) -> None:
        count = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != count or self.images.shape[1] != 1:
            raise ValueError(
                f"images must be N x 1 x H x W with N = {count}, got {self.images.shape}"
            )
        for name in ("paths", "hashes", "patients", "sources", "fixed_splits"):
            values = getattr(self, name)
            if name != "paths" and not values:
                object.__setattr__(self, name, ("",) * count)
            elif len(values) != count:
                raise ValueError(f"{len(values)} {name} for {count} images")

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts, strict=True)}

    def select(self, keep: np.ndarray) -> Dataset:
        """The images where ``keep`` (a boolean mask or indices) selects them."""
        indices = np.flatnonzero(keep) if keep.dtype == bool else keep

        def pick(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(values[index] for index in indices)

        return Dataset(
            images=self.images[indices],
            labels=self.labels[indices],
            class_names=self.class_names,
            paths=pick(self.paths),
            hashes=pick(self.hashes),
            patients=pick(self.patients),
            sources=pick(self.sources),
            fixed_splits=pick(self.fixed_splits),
        )


@dataclass
class IngestReport:
    """What ingest saw and did: counts, sizes, modes, groups, duplicates, refused files."""

    data: str
    layout: str
    classes: dict[str, int] = field(default_factory=dict)  # images per class, after policy
    sizes: dict[str, int] = field(default_factory=dict)  # "W x H" -> images
    modes: dict[str, int] = field(default_factory=dict)  # PIL mode (or DICOM) -> images
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)  # DICOM images per syntax
    patients: int = 0  # distinct patient ids (0 = none given)
    sources: int = 0
    duplicate_sets: int = 0  # contents that occur more than once
    duplicate_images: int = 0  # images in those sets
    conflicts: list[list[str]] = field(default_factory=list)  # "path (label)" per shared content
    # "path (split)" per content a manifest's own split column puts in two splits
    split_conflicts: list[list[str]] = field(default_factory=list)
    dropped_conflicting: int = 0
    bad_files: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    shortcut: dict[str, Any] = field(default_factory=dict)  # a ShortcutCheck; {} = not run

    def shortcut_check(self) -> ShortcutCheck | None:
        """The shortcut probe's result, when two or more sources allowed one."""
        return ShortcutCheck(**self.shortcut) if self.shortcut else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IngestReport:
        return cls(**json.loads(text))

    def to_text(self) -> str:
        """The report as a person reads it (``cxrtune data inspect``)."""
        total = sum(self.classes.values())
        lines = [f"Data: {self.data}", f"Layout: {self.layout}", f"Images: {total}"]
        lines += [f"  {name}: {count}" for name, count in self.classes.items()]
        lines.append("Sizes: " + _top(self.sizes))
        lines.append("Modes: " + _top(self.modes))
        if self.transfer_syntaxes:
            lines.append("DICOM transfer syntaxes:")
            lines += [f"  {name}: {count}" for name, count in self.transfer_syntaxes.items()]
        groups = [f"{self.patients} patients" if self.patients else "no patient ids"]
        groups.append(f"{self.sources} sources" if self.sources else "no sources")
        lines.append("Groups: " + ", ".join(groups))
        lines.append(
            f"Exact duplicates: {self.duplicate_sets} contents in {self.duplicate_images} images"
            " (kept together in one split)"
        )
        if self.conflicts:
            lines.append(f"Images under two labels: {len(self.conflicts)}")
            lines += [f"  {' == '.join(paths)}" for paths in self.conflicts]
        if self.split_conflicts:
            lines.append(f"Images in two splits of the manifest: {len(self.split_conflicts)}")
            lines += [f"  {' == '.join(paths)}" for paths in self.split_conflicts]
        if self.dropped_conflicting:
            lines.append(f"  dropped: {self.dropped_conflicting} images")
        if self.bad_files:
            verb = "skipped" if self.skipped else "refused"
            lines.append(f"Unreadable files ({verb}): {len(self.bad_files)}")
            lines += [f"  {bad['path']}: {bad['reason']}" for bad in self.bad_files]
        lines += [f"Note: {note}" for note in self.notes]
        check = self.shortcut_check()
        if check is not None:
            probed = ", ".join(f"{name} ({count})" for name, count in check.sources.items())
            lines.append(f"Shortcut check over sources {probed}: {check.summary()}")
            lines.append(check.warning() or "  no shortcut found: no warning")
        return "\n".join(lines)


def _top(counts: dict[str, int], shown: int = 5) -> str:
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    text = ", ".join(f"{key} ({count})" for key, count in ordered[:shown])
    return text + (f", and {len(ordered) - shown} more" if len(ordered) > shown else "")


@dataclass(frozen=True)
class Ingested:
    """The result of ``ingest``."""

    dataset: Dataset
    report: IngestReport
    cache_path: Path
    layout: str


def default_cache_dir() -> Path:
    """``$CXRTUNE_CACHE_DIR``, else ``~/.cache/cxrtune``."""
    configured = os.environ.get("CXRTUNE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "cxrtune"


def read_gray(path: Path) -> tuple[Image.Image, str]:
    """Read any supported image as an 8-bit grayscale PIL image; also return its source mode.

    EXIF rotation is applied; transparency is composited on black (the film
    background); 16-bit and float images are stretched to their own range rather
    than clipped, since X-ray PNGs often use only the low 12 bits. Images over
    PIL's decompression-bomb limit are refused. A DICOM file's mode is
    ``DICOM (<transfer syntax>)``.
    """
    if path.suffix.lower() == ".dcm":
        pixels, syntax = read_dicom(path)
        return Image.fromarray(pixels), f"{DICOM_MODE} ({syntax})"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            opened.load()
            mode = opened.mode
            # exif_transpose copies even an upright image: a 3,000-pixel X-ray is 18 MB.
            upright = opened.getexif().get(ORIENTATION_TAG, 1) == 1
            image = opened if upright else ImageOps.exif_transpose(opened)
    if image.width == 0 or image.height == 0:
        raise DataError("image has zero size")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_stretch_to_8_bits(np.asarray(image)))
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    elif image.mode == "CMYK":
        image = image.convert("RGB")
    return image.convert("L"), mode


def _stretch_to_8_bits(values: np.ndarray) -> np.ndarray:
    """An image's own min..max mapped to 0..255 (a constant image is all 0).

    16-bit images (most X-ray PNGs) go through a lookup table built for their range, so a
    3,000-pixel image never exists as floats: a fraction of the time and an eighth of the
    memory of the float formula, with the same result.
    """
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        # Indexed by the value itself; entries below ``low`` are never looked up.
        span = np.arange(int(high) + 1, dtype=np.float64)
        table = np.rint((span - float(low)) / (float(high) - float(low)) * 255.0)
        return np.clip(table, 0, 255).astype(np.uint8)[values]
    scaled = (values.astype(np.float64) - float(low)) / (float(high) - float(low)) * 255.0
    return np.rint(scaled).astype(np.uint8)


def split_mode(mode: str) -> tuple[str, str]:
    """``DICOM (<syntax>)`` -> ``("DICOM", "<syntax>")``; any other mode -> ``(mode, "")``."""
    if mode.startswith(f"{DICOM_MODE} (") and mode.endswith(")"):
        return DICOM_MODE, mode[len(DICOM_MODE) + 2 : -1]
    return mode, ""


def resize(image: Image.Image, image_size: int) -> np.ndarray:
    """Squash to ``image_size`` square, as the models see it."""
    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """Read ``path`` as 8-bit grayscale ``image_size x image_size``."""
    return resize(read_gray(path)[0], image_size)


def content_hash(gray: Image.Image) -> str:
    """Hash of the decoded pixels: equal for the same picture saved in different files."""
    digest = hashlib.sha256(f"{gray.width}x{gray.height}".encode())
    digest.update(gray.tobytes())
    return digest.hexdigest()[:20]


DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


@dataclass
class _Decoded:
    """Everything decoding produced, before policy; this is what the cache holds."""

    images: np.ndarray
    ok: np.ndarray  # bool per sample
    hashes: list[str]
    modes: list[str]
    sizes: list[str]
    reasons: list[str]  # "" where ok


def _decode_all(listing: Listing, image_size: int, progress: Progress | None) -> _Decoded:
    count = len(listing.samples)
    decoded = _Decoded(
        images=np.zeros((count, 1, image_size, image_size), dtype=np.uint8),
        ok=np.zeros(count, dtype=bool),
        hashes=[""] * count,
        modes=[""] * count,
        sizes=[""] * count,
        reasons=[""] * count,
    )

    def decode(index: int) -> None:
        if listing.samples[index].problem:
            decoded.reasons[index] = listing.samples[index].problem
            return
        try:
            gray, mode = read_gray(listing.samples[index].path)
            decoded.images[index, 0] = resize(gray, image_size)
        except (*DECODE_ERRORS, DicomError, DataError) as error:
            decoded.reasons[index] = read_error_reason(error)
            return
        decoded.ok[index] = True
        decoded.hashes[index] = content_hash(gray)
        decoded.modes[index] = mode
        decoded.sizes[index] = f"{gray.width} x {gray.height}"

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(decode, range(count)), start=1):
            if progress is not None:
                progress(done, count)
    return decoded


def read_error_reason(error: BaseException) -> str:
    """Why a file could not be read, in words for the ingest report and `predict`."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read (corrupt, empty or another format)"
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"larger than PIL's decompression-bomb limit ({error})"
    return f"{type(error).__name__}: {error}"


def fingerprint(listing: Listing, layout: str, image_size: int) -> str:
    """A key that changes when a sample is added, removed, relabelled, resized or touched."""
    digest = hashlib.sha256()
    header = {"version": CACHE_FORMAT_VERSION, "size": image_size, "layout": layout}
    digest.update(json.dumps(header).encode())
    digest.update(json.dumps(listing.classes).encode())
    for sample in listing.samples:
        try:
            stat = sample.path.stat()
            signature = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        fields = (
            str(sample.path),
            sample.label,
            sample.patient,
            sample.source,
            sample.split,
            str(sample.line),
            sample.problem,
        )
        digest.update(("\0".join(fields) + f"\0{signature}\n").encode())
    return digest.hexdigest()[:24]


def ingest(
    data: str | Path,
    image_size: int,
    *,
    layout: str = "auto",
    skip_bad_images: bool = False,
    drop_conflicting_duplicates: bool = False,
    manifest_encoding: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Ingested:
    """Decode ``data`` (or reuse its cache), apply the bad-file and duplicate policy, report.

    Raises ``DataError`` listing every unreadable file (unless ``skip_bad_images``),
    every image found under two labels (unless ``drop_conflicting_duplicates``), and
    for fewer than two classes or a class without images. ``manifest_encoding`` is the
    text encoding of a CSV manifest (default UTF-8, with or without a byte-order mark).
    """
    data = Path(data).expanduser().resolve()
    if not data.exists():
        raise DataError(f"dataset not found: {data}")
    try:
        chosen: Layout = detect_layout(data) if layout == "auto" else get_layout(layout)
        if chosen.name == "manifest":
            listing = list_manifest(data, encoding=manifest_encoding)
        else:
            listing = chosen.list_samples(data)
    except (LayoutError, ValueError) as error:
        raise DataError(str(error)) from error
    _check_classes(data, listing)

    cache_dir = (cache_dir or default_cache_dir()) / "datasets"
    cache_path = cache_dir / f"{fingerprint(listing, chosen.name, image_size)}.npz"
    base = data.parent if data.is_file() else data
    if cache_path.is_file():
        everything, extras = read_cache(cache_path), read_cache_extras(cache_path)
    else:
        decoded = _decode_all(listing, image_size, progress)
        everything, extras = _as_dataset(listing, decoded, base)
        write_cache(everything, cache_path, extras)

    failures = extras.failures
    report = IngestReport(data=str(data), layout=chosen.name, notes=list(extras.notes))
    modes = [split_mode(mode) for mode in extras.modes]
    report.sizes = dict(Counter(extras.sizes))
    report.modes = dict(Counter(mode for mode, _ in modes))
    report.transfer_syntaxes = dict(Counter(syntax for _, syntax in modes if syntax))
    report.bad_files = failures
    if failures and not skip_bad_images:
        listing_text = "\n  ".join(f"{bad['path']}: {bad['reason']}" for bad in failures)
        raise DataError(
            f"{len(failures)} file(s) could not be used:\n  {listing_text}\n"
            "Fix or remove them, or pass --skip-bad-images to leave them out."
        )
    report.skipped = len(failures)
    dataset = _apply_duplicate_policy(everything, report, drop_conflicting_duplicates)
    _check_no_empty_class(dataset)
    report.classes = dataset.class_counts()
    report.patients = len({patient for patient in dataset.patients if patient})
    report.sources = len({source for source in dataset.sources if source})
    if report.sources >= 2:
        check = check_shortcut(dataset.images, dataset.labels, dataset.sources)
        report.shortcut = check.to_dict() if check is not None else {}
    return Ingested(dataset=dataset, report=report, cache_path=cache_path, layout=chosen.name)


def _check_classes(data: Path, listing: Listing) -> None:
    if len(listing.classes) < 2:
        raise DataError(
            f"{data} must hold at least 2 classes, found {len(listing.classes)}: {listing.classes}"
        )
    present = {sample.label for sample in listing.samples}
    empty = [name for name in listing.classes if name not in present]
    if empty:
        raise DataError(f"class(es) with no PNG/JPEG/DICOM images in {data}: {empty}")


def _check_no_empty_class(dataset: Dataset) -> None:
    empty = [name for name, count in dataset.class_counts().items() if count == 0]
    if empty:
        raise DataError(f"class(es) left with no readable image: {empty}")


def _as_dataset(listing: Listing, decoded: _Decoded, base: Path) -> tuple[Dataset, CacheExtras]:
    class_names = tuple(listing.classes)
    label_of = {name: index for index, name in enumerate(class_names)}
    samples = listing.samples
    relative = [_relative(sample.path, base) for sample in samples]
    failures = [
        {"path": relative[index], "reason": decoded.reasons[index] + _line_of(samples[index])}
        for index in np.flatnonzero(~decoded.ok)
    ]
    good = np.flatnonzero(decoded.ok)
    dataset = Dataset(
        images=_compact(decoded.images, good),
        labels=np.array([label_of[samples[i].label] for i in good], dtype=np.int64),
        class_names=class_names,
        paths=tuple(relative[i] for i in good),
        hashes=tuple(decoded.hashes[i] for i in good),
        patients=tuple(samples[i].patient for i in good),
        sources=tuple(samples[i].source for i in good),
        fixed_splits=tuple(samples[i].split for i in good),
    )
    extras = CacheExtras(
        failures=failures,
        notes=list(listing.notes),
        sizes=[decoded.sizes[i] for i in good],
        modes=[decoded.modes[i] for i in good],
    )
    return dataset, extras


def _compact(images: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``images[keep]`` for sorted ``keep``, moved within ``images`` rather than copied.

    The decoded array is the largest thing ingest holds (1 GB for 21,000 images at 224
    px); a fancy-indexed copy would double the peak.
    """
    for target, origin in enumerate(keep):
        if target != origin:
            images[target] = images[origin]
    return images[: len(keep)]


def _line_of(sample: Sample) -> str:
    return f" (manifest line {sample.line})" if sample.line else ""


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:  # a manifest may point outside its own folder
        return path.as_posix()


def repeated_contents(dataset: Dataset) -> list[list[int]]:
    """The indices of the copies of each content (content hash) found more than once."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(dataset.hashes):
        by_hash[digest].append(index)
    return [indices for indices in by_hash.values() if len(indices) > 1]


def contents_in_two_splits(dataset: Dataset) -> list[list[int]]:
    """The copies of each content that a manifest's own ``split`` column puts in two splits."""
    return [
        indices
        for indices in repeated_contents(dataset)
        if len({dataset.fixed_splits[i] for i in indices} - {""}) > 1
    ]


def _apply_duplicate_policy(dataset: Dataset, report: IngestReport, drop: bool) -> Dataset:
    """Count exact duplicates; refuse (or drop) contents that carry two labels or two splits.

    Two splits come from a manifest's own ``split`` column: kept, one image would be
    trained on and tested on.
    """
    repeated = repeated_contents(dataset)
    report.duplicate_sets = len(repeated)
    report.duplicate_images = sum(len(indices) for indices in repeated)
    conflicting = [
        indices for indices in repeated if len({int(dataset.labels[i]) for i in indices}) > 1
    ]
    in_two_splits = contents_in_two_splits(dataset)
    report.conflicts = [
        [f"{dataset.paths[i]} ({dataset.class_names[dataset.labels[i]]})" for i in indices]
        for indices in conflicting
    ]
    report.split_conflicts = [
        [f"{dataset.paths[i]} ({dataset.fixed_splits[i]})" for i in indices]
        for indices in in_two_splits
    ]
    if not conflicting and not in_two_splits:
        return dataset
    if not drop:
        problems, fixes = [], []
        if conflicting:
            pairs = "\n  ".join(" == ".join(paths) for paths in report.conflicts)
            problems.append(f"{len(conflicting)} image(s) appear under two labels:\n  {pairs}")
            fixes.append("the labels")
        if in_two_splits:
            pairs = "\n  ".join(" == ".join(paths) for paths in report.split_conflicts)
            problems.append(
                f"{len(in_two_splits)} image(s) appear in two splits of the manifest's split "
                f"column:\n  {pairs}"
            )
            fixes.append("the split column")
        raise DataError(
            "\n".join(problems) + f"\nFix {' and '.join(fixes)}, or pass "
            "--drop-conflicting-duplicates to leave all copies out."
        )
    keep = np.ones(len(dataset.labels), dtype=bool)
    for indices in conflicting + in_two_splits:
        keep[indices] = False
    report.dropped_conflicting = int((~keep).sum())
    return dataset.select(keep)


@dataclass
class CacheExtras:
    """What the cache keeps beside the arrays, for the ingest report."""

    failures: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    notes: list[str] = field(default_factory=list)  # the layout's notes
    sizes: list[str] = field(default_factory=list)  # per readable image, "W x H"
    # per readable image, PIL mode or DICOM (<transfer syntax>)
    modes: list[str] = field(default_factory=list)


def write_cache(dataset: Dataset, cache_path: Path, extras: CacheExtras | None = None) -> None:
    """Write ``dataset`` to ``cache_path`` atomically: readers see no file or the whole file."""
    extras = extras or CacheExtras()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path) as partial, partial.open("wb") as stream:
        np.savez(
            stream,
            images=dataset.images,
            labels=dataset.labels,
            class_names=np.array(dataset.class_names),
            paths=np.array(dataset.paths, dtype=str),
            hashes=np.array(dataset.hashes, dtype=str),
            patients=np.array(dataset.patients, dtype=str),
            sources=np.array(dataset.sources, dtype=str),
            fixed_splits=np.array(dataset.fixed_splits, dtype=str),
            sizes=np.array(extras.sizes, dtype=str),
            modes=np.array(extras.modes, dtype=str),
            failures=np.array(json.dumps(extras.failures)),
            notes=np.array(json.dumps(extras.notes)),
        )


def read_cache(cache_path: Path) -> Dataset:
    """Every readable image of a cache written by ``write_cache`` (before any policy)."""
    with np.load(cache_path, allow_pickle=False) as arrays:

        def strings(name: str) -> tuple[str, ...]:
            return tuple(str(value) for value in arrays[name]) if name in arrays else ()

        return Dataset(
            images=arrays["images"],
            labels=arrays["labels"],
            class_names=strings("class_names"),
            paths=strings("paths"),
            hashes=strings("hashes"),
            patients=strings("patients"),
            sources=strings("sources"),
            fixed_splits=strings("fixed_splits"),
        )


def read_cache_extras(cache_path: Path) -> CacheExtras:
    """The report facts a cache keeps beside its arrays."""
    with np.load(cache_path, allow_pickle=False) as arrays:
        return CacheExtras(
            failures=list(json.loads(str(arrays["failures"]))),
            notes=list(json.loads(str(arrays["notes"]))),
            sizes=[str(size) for size in arrays["sizes"]],
            modes=[str(mode) for mode in arrays["modes"]],
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
