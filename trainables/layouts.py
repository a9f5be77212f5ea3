"""Dataset layouts: how a folder or manifest becomes a list of labelled image files.

Each layout is registered by name and knows how to recognise itself. A layout
only lists samples (path, label, and patient, source or split when it knows
them); decoding happens in ``cxrtune.trainables.data``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm"})
MANIFEST_COLUMNS = ("path", "label")
MANIFEST_OPTIONAL_COLUMNS = ("patient_id", "source", "split")
SPLIT_NAMES = ("train", "val", "test")


class LayoutError(ValueError):
    """A dataset does not have the shape its layout needs; the message says what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One image file and what the layout knows about it."""

    path: Path
    label: str
    patient: str = ""  # "" when unknown
    source: str = ""
    split: str = ""  # a split fixed by the dataset itself (manifests), else ""


@dataclass
class Listing:
    """The samples of a dataset, its classes, and notes the ingest report should carry."""

    samples: list[Sample]
    classes: list[str]  # every class the layout declares, including ones with no image
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """A named dataset layout: a recogniser and a lister."""

    name: str
    detect: Callable[[Path], bool]
    list_samples: Callable[[Path], Listing]


LAYOUTS: dict[str, Layout] = {}


def register_layout(
    name: str, detect: Callable[[Path], bool]
) -> Callable[[Callable[[Path], Listing]], Callable[[Path], Listing]]:
    """Register a lister under ``name``; layouts are tried for detection in registration order."""

    def decorate(lister: Callable[[Path], Listing]) -> Callable[[Path], Listing]:
        if name in LAYOUTS:
            raise ValueError(f"dataset layout {name!r} is already registered")
        LAYOUTS[name] = Layout(name=name, detect=detect, list_samples=lister)
        return lister

    return decorate


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``; unknown names raise listing the known ones."""
    try:
        return LAYOUTS[name]
    except KeyError:
        known = ", ".join(LAYOUTS)
        raise ValueError(f"unknown dataset layout {name!r}; known layouts: {known}") from None


def detect_layout(data: Path) -> Layout:
    """The first registered layout that recognises ``data``."""
    if not data.exists():
        raise LayoutError(f"dataset not found: {data}")
    for layout in LAYOUTS.values():
        if layout.detect(data):
            return layout
    raise LayoutError(
        f"{data} matches no dataset layout; give a folder with one subfolder per class "
        "or a CSV manifest with path,label columns"
    )


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(entry for entry in root.iterdir() if entry.is_dir() and _visible(entry, root))


def _images_under(folder: Path, root: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and _visible(path, root)
    )


def _is_manifest(data: Path) -> bool:
    return data.is_file() and data.suffix.lower() == ".csv"


@register_layout("manifest", detect=_is_manifest)
def list_manifest(manifest: Path) -> Listing:
    """A CSV with ``path,label`` and optional ``patient_id``, ``source``, ``split`` columns.

    Paths are relative to the CSV's folder. Empty cells in required columns and
    unknown split names are errors naming the rows.
    """
    if not _is_manifest(manifest):
        raise LayoutError(f"{manifest} is not a CSV manifest")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [column for column in MANIFEST_COLUMNS if column not in table]
    if missing:
        raise LayoutError(f"{manifest}: missing column(s) {missing}; found {list(table.columns)}")
    unknown = sorted(set(table.columns) - set(MANIFEST_COLUMNS) - set(MANIFEST_OPTIONAL_COLUMNS))
    if unknown:
        raise LayoutError(
            f"{manifest}: unknown column(s) {unknown}; "
            f"known: {[*MANIFEST_COLUMNS, *MANIFEST_OPTIONAL_COLUMNS]}"
        )
    for column in MANIFEST_COLUMNS:
        empty = (table[column].str.strip() == "").to_numpy().nonzero()[0]
        if len(empty):
            raise LayoutError(f"{manifest}: empty {column!r} in row(s) {_row_numbers(empty)}")
    if "split" in table:
        bad = (~table["split"].isin(SPLIT_NAMES)).to_numpy().nonzero()[0]
        if len(bad):
            raise LayoutError(
                f"{manifest}: split must be one of {list(SPLIT_NAMES)} in every row; "
                f"not in row(s) {_row_numbers(bad)}"
            )
    base = manifest.parent
    samples = [
        Sample(
            path=(base / row["path"]).resolve(),
            label=row["label"].strip(),
            patient=row.get("patient_id", "").strip(),
            source=row.get("source", "").strip(),
            split=row.get("split", "").strip(),
        )
        for row in table.to_dict("records")
    ]
    return Listing(samples, classes=sorted({sample.label for sample in samples}))


def _row_numbers(positions: object) -> str:
    # Spreadsheet row numbers: the header is row 1.
    rows = [int(position) + 2 for position in positions]  # type: ignore[attr-defined]
    shown = ", ".join(map(str, rows[:10]))
    return shown + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def _is_radiography_database(data: Path) -> bool:
    if not data.is_dir():
        return False
    classes = _class_dirs(data)
    return len(classes) >= 2 and all((folder / "images").is_dir() for folder in classes)


@register_layout("radiography", detect=_is_radiography_database)
def list_radiography_database(root: Path) -> Listing:
    """The COVID-19 Radiography Database: ``<class>/images/*`` with ``masks/`` beside it.

    Masks are never samples. The source column (``URL``) of ``<class>.metadata.xlsx``
    becomes each image's source group when the sheet can be read.
    """
    folders = _class_dirs(root)
    listing = Listing(samples=[], classes=[folder.name for folder in folders])
    for folder in folders:
        sources = _read_radiography_sources(root, folder.name, listing.notes)
        listing.samples.extend(
            Sample(path=path, label=folder.name, source=sources.get(path.stem.lower(), ""))
            for path in _images_under(folder / "images", root)
        )
    return listing


def _read_radiography_sources(root: Path, class_name: str, notes: list[str]) -> dict[str, str]:
    """``file stem -> source`` from the class's metadata sheet; {} with a note when unreadable."""
    sheet = root / f"{class_name}.metadata.xlsx"
    if not sheet.is_file():
        return {}
    try:
        table = pd.read_excel(sheet, dtype=str)
    except ImportError:
        notes.append(
            f"{sheet.name}: no xlsx reader is installed (pip install openpyxl); "
            "images are not grouped by source"
        )
        return {}
    except (OSError, ValueError) as error:
        notes.append(f"{sheet.name}: unreadable ({error}); images are not grouped by source")
        return {}
    columns = {column.strip().upper(): column for column in table.columns}
    if "FILE NAME" not in columns or "URL" not in columns:
        notes.append(f"{sheet.name}: no 'FILE NAME' and 'URL' columns; not grouped by source")
        return {}
    names = table[columns["FILE NAME"]].fillna("").str.strip().str.lower()
    urls = table[columns["URL"]].fillna("").str.strip()
    return dict(zip(names, urls, strict=True))


def _is_image_folder(data: Path) -> bool:
    return data.is_dir()


@register_layout("imagefolder", detect=_is_image_folder)
def list_image_folder(root: Path) -> Listing:
    """``ROOT/<class>/**/<image>``: the class is the top folder; hidden entries are skipped."""
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    folders = _class_dirs(root)
    return Listing(
        samples=[
            Sample(path=path, label=folder.name)
            for folder in folders
            for path in _images_under(folder, root)
        ],
        classes=[folder.name for folder in folders],
    )
