"""Dataset layouts: how a folder or manifest becomes a list of labelled image files.

Each layout is registered by name and knows how to recognise itself. A layout
only lists samples (path, label, and patient, source or split when it knows
them); decoding happens in ``cxrtune.trainables.data``.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrtune.spaces import Registry

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "Layout",
    "LayoutError",
    "Listing",
    "Sample",
    "detect_layout",
    "get_layout",
    "images_under",
    "list_manifest",
    "register_layout",
]

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
    line: int = 0  # the manifest line it came from (the header is line 1), else 0
    problem: str = ""  # why the layout already refuses this sample (ingest lists it), else ""


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


LAYOUTS: Registry[Layout] = Registry("dataset layout")


def register_layout(
    name: str, detect: Callable[[Path], bool]
) -> Callable[[Callable[[Path], Listing]], Callable[[Path], Listing]]:
    """Register a lister under ``name``; layouts are tried for detection in registration order."""

    def decorate(lister: Callable[[Path], Listing]) -> Callable[[Path], Listing]:
        LAYOUTS.add(name, Layout(name=name, detect=detect, list_samples=lister))
        return lister

    return decorate


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``; unknown names raise listing the known ones."""
    return LAYOUTS.lookup(name)


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


def images_under(folder: Path, root: Path | None = None) -> list[Path]:
    """The PNG, JPEG and DICOM files below ``folder``, sorted; hidden ones skipped.

    A file or folder whose name starts with a dot, below ``root`` (``folder`` itself by
    default), is hidden.
    """
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and _visible(path, root if root is not None else folder)
    )


def _is_manifest(data: Path) -> bool:
    return data.is_file() and data.suffix.lower() == ".csv"


@register_layout("manifest", detect=_is_manifest)
def list_manifest(manifest: Path, encoding: str | None = None) -> Listing:
    """A CSV with ``path,label`` and optional ``patient_id``, ``source``, ``split`` columns.

    The CSV is UTF-8 (a byte-order mark is fine) unless ``encoding`` names another;
    text that does not decode is an error naming the line. Column names match case-,
    space- and underscore-insensitively (``Patient ID``, ``patientid``). Paths are
    absolute or relative to the CSV's folder. Rows with an empty label are left out
    and listed in the notes; an empty path or an unknown split name is an error naming
    the lines. Each sample keeps its CSV line number, so a missing file is named by it.
    """
    if not _is_manifest(manifest):
        raise LayoutError(f"{manifest} is not a CSV manifest")
    text = _read_manifest_text(manifest, encoding)
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    known = [*MANIFEST_COLUMNS, *MANIFEST_OPTIONAL_COLUMNS]
    by_key = {_column_key(name): name for name in known}
    table.columns = [by_key.get(_column_key(str(column)), str(column)) for column in table]
    repeated = sorted({column for column in table.columns if list(table.columns).count(column) > 1})
    if repeated:
        raise LayoutError(
            f"{manifest}: column(s) {repeated} given twice (names match ignoring case)"
        )
    missing = [column for column in MANIFEST_COLUMNS if column not in table]
    if missing:
        raise LayoutError(f"{manifest}: missing column(s) {missing}; found {list(table.columns)}")
    unknown = sorted(set(table.columns) - set(known))
    if unknown:
        raise LayoutError(f"{manifest}: unknown column(s) {unknown}; known: {known}")
    table = table.apply(lambda column: column.str.strip())
    empty_path = (table["path"] == "").to_numpy().nonzero()[0]
    if len(empty_path):
        raise LayoutError(f"{manifest}: empty 'path' on line(s) {_row_numbers(empty_path)}")
    if "split" in table:
        bad = (~table["split"].isin(SPLIT_NAMES)).to_numpy().nonzero()[0]
        if len(bad):
            raise LayoutError(
                f"{manifest}: split must be one of {list(SPLIT_NAMES)} in every row; "
                f"not on line(s) {_row_numbers(bad)}"
            )
    notes = []
    unlabelled = (table["label"] == "").to_numpy().nonzero()[0]
    if len(unlabelled):
        notes.append(
            f"{manifest.name}: {len(unlabelled)} row(s) with an empty label left out, "
            f"line(s) {_row_numbers(unlabelled)}"
        )
    base = manifest.parent
    class_of = _class_spellings(table["label"][table["label"] != ""])
    samples = [
        Sample(
            path=(base / Path(row["path"]).expanduser()).resolve(),
            label=class_of[row["label"]],
            patient=row.get("patient_id", ""),
            source=row.get("source", ""),
            split=row.get("split", ""),
            line=position + 2,
            problem=(
                ""
                if class_of[row["label"]] == row["label"]
                else f"label {row['label']!r} matches no class (class {class_of[row['label']]!r}"
                " is spelled otherwise)"
            ),
        )
        for position, row in enumerate(table.to_dict("records"))
        if row["label"]
    ]
    return Listing(samples, classes=sorted(set(class_of.values())), notes=notes)


def _class_spellings(labels: pd.Series) -> dict[str, str]:
    """Each label -> its class: labels equal but for case, spaces and punctuation are one
    class, spelled as most rows spell it (ties: the first in sort order). A row spelled
    otherwise is refused rather than silently made a class of its own or relabelled."""
    counts = labels.value_counts()
    by_key: dict[str, list[str]] = {}
    for label in sorted(counts.index):
        by_key.setdefault(re.sub(r"[^0-9a-z]", "", label.lower()), []).append(label)
    return {
        label: max(spellings, key=lambda spelling: (counts[spelling], -spellings.index(spelling)))
        for spellings in by_key.values()
        for label in spellings
    }


def _read_manifest_text(manifest: Path, encoding: str | None) -> str:
    """The CSV's text; bytes that are not ``encoding`` (default UTF-8) name their line."""
    raw = manifest.read_bytes()
    try:
        codecs.lookup(encoding or "utf-8")
    except LookupError:
        raise LayoutError(f"{manifest}: unknown manifest encoding {encoding!r}") from None
    try:
        # utf-8-sig drops a byte-order mark, as spreadsheet programs write one.
        return raw.decode("utf-8-sig" if encoding is None else encoding)
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        byte = raw[error.start : error.start + 1].hex()
        hint = (
            "save it as UTF-8, or pass --manifest-encoding (for example latin-1)"
            if encoding is None
            else "check --manifest-encoding"
        )
        raise LayoutError(
            f"{manifest}: line {line} is not {encoding or 'UTF-8'} text (byte 0x{byte}); {hint}"
        ) from None


def _column_key(name: str) -> str:
    """``Patient ID``, ``patient_id`` and ``PatientId`` all become ``patientid``."""
    return re.sub(r"[\s_\-]", "", name.lower())


def _row_numbers(positions: object) -> str:
    # CSV line numbers: the header is line 1.
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
            for path in images_under(folder / "images", root)
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
    """``ROOT/<class>/**/<image>``: the class is the top folder; hidden entries are skipped.

    An image in a subfolder of its class folder (``COVID/site a/1.png``) has that
    subfolder's name as its source, so merged collections can be told apart.
    """
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    folders = _class_dirs(root)
    return Listing(
        samples=[
            Sample(path=path, label=folder.name, source=_subfolder_of(path, folder))
            for folder in folders
            for path in images_under(folder, root)
        ],
        classes=[folder.name for folder in folders],
    )


def _subfolder_of(path: Path, folder: Path) -> str:
    parts = path.relative_to(folder).parts
    return parts[0] if len(parts) > 1 else ""
