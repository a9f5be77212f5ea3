"""Ingest of real-world-shaped datasets: layouts, bad files, duplicates, conversions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrtune.trainables import data
from cxrtune.trainables.data import DataError, ingest, read_gray
from cxrtune.trainables.layouts import LAYOUTS, detect_layout, get_layout
from cxrtune.trainables.splits import group_ids, make_splits
from tests.conftest import write_png

RADIOGRAPHY_CLASSES = {"COVID": 4, "Lung_Opacity": 5, "Normal": 6, "Viral Pneumonia": 5}


def distinct_pixels(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def make_radiography_database(root: Path, *, with_metadata: bool = True) -> Path:
    """The Kaggle release's shape: <class>/images and <class>/masks, metadata sheets beside."""
    modes = ["L", "RGB", "RGBA", "I;16", "P"]
    seed = 0
    for class_name, count in RADIOGRAPHY_CLASSES.items():
        rows = []
        for index in range(count):
            seed += 1
            pixels = distinct_pixels(seed)
            name = f"{class_name}-{index + 1}"
            image = Image.fromarray(pixels)
            mode = modes[index % len(modes)]
            if mode == "I;16":
                image = Image.fromarray(pixels.astype(np.uint16) * 200)
            elif mode != "L":
                image = image.convert(mode)
            (root / class_name / "images").mkdir(parents=True, exist_ok=True)
            image.save(root / class_name / "images" / f"{name}.png")
            write_png(root / class_name / "masks" / f"{name}.png", distinct_pixels(seed + 5000))
            rows.append(
                {
                    "FILE NAME": name,
                    "FORMAT": "PNG",
                    "SIZE": "24*24",
                    "URL": f"https://source-{index % 2}.example/{class_name}",
                }
            )
        if with_metadata:
            pd.DataFrame(rows).to_excel(root / f"{class_name}.metadata.xlsx", index=False)
    return root


def test_the_radiography_database_is_read_with_masks_ignored(tmp_path: Path) -> None:
    root = make_radiography_database(tmp_path / "COVID-19_Radiography_Dataset")
    result = ingest(root, 16)
    assert result.layout == "radiography"
    assert result.dataset.class_counts() == RADIOGRAPHY_CLASSES
    assert not [path for path in result.dataset.paths if "/masks/" in path]
    assert "Viral Pneumonia/images/Viral Pneumonia-1.png" in result.dataset.paths
    assert {"L", "RGB", "RGBA", "I;16", "P"} <= set(result.report.modes)


def test_the_radiography_metadata_source_becomes_the_group(tmp_path: Path) -> None:
    root = make_radiography_database(tmp_path / "db")
    result = ingest(root, 16)
    assert result.report.sources == 8  # two sources per class
    assert result.dataset.sources[0] == "https://source-0.example/COVID"


def test_without_an_xlsx_reader_the_sources_are_dropped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_radiography_database(tmp_path / "db")

    def no_reader(*args: object, **kwargs: object) -> None:
        raise ImportError("Missing optional dependency 'openpyxl'")

    monkeypatch.setattr(pd, "read_excel", no_reader)
    result = ingest(root, 16)
    assert result.report.sources == 0
    assert any("openpyxl" in note for note in result.report.notes)
    assert result.dataset.class_counts() == RADIOGRAPHY_CLASSES


def test_layouts_are_detected_and_can_be_forced(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    plain = make_image_folder({"COVID": 2, "Normal": 2})
    database = make_radiography_database(tmp_path / "db")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    assert detect_layout(plain).name == "imagefolder"
    assert detect_layout(database).name == "radiography"
    assert detect_layout(manifest).name == "manifest"
    # Forced, the Radiography Database is just folders of images, masks included.
    forced = ingest(database, 16, layout="imagefolder")
    assert forced.layout == "imagefolder"
    assert len(forced.dataset.labels) == 2 * sum(RADIOGRAPHY_CLASSES.values())


def test_an_unknown_layout_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="imagefolder"):
        get_layout("dicomdir")
    with pytest.raises(DataError, match="radiography"):
        ingest(tmp_path, 16, layout="dicomdir")
    assert list(LAYOUTS) == ["manifest", "radiography", "imagefolder"]


def write_manifest(root: Path, rows: list[dict[str, str]]) -> Path:
    for index, row in enumerate(rows):
        write_png(root / row["path"], distinct_pixels(1000 + index))
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_a_manifest_gives_paths_labels_patients_and_sources(tmp_path: Path) -> None:
    rows = [
        {
            "path": f"scans/{i}.png",
            "label": "COVID" if i % 3 == 0 else "Normal",
            "patient_id": f"p{i // 2}",
            "source": f"s{i % 2}",
        }
        for i in range(12)
    ]
    result = ingest(write_manifest(tmp_path, rows), 16)
    assert result.layout == "manifest"
    assert result.dataset.paths[0] == "scans/0.png"
    assert result.report.patients == 6 and result.report.sources == 2
    assert result.dataset.class_counts() == {"COVID": 4, "Normal": 8}


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"path": ["a.png"], "labels": ["COVID"]}, "missing column"),
        ({"path": ["a.png"], "label": ["COVID"], "patient": ["p"]}, "unknown column"),
        ({"path": ["a.png", ""], "label": ["COVID", "Normal"]}, "empty 'path' on line"),
        ({"path": ["a.png"], "label": ["COVID"], "split": ["training"]}, "split must be one of"),
    ],
)
def test_a_malformed_manifest_is_an_error_saying_what_is_wrong(
    tmp_path: Path, columns: dict[str, list[str]], message: str
) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame(columns).to_csv(manifest, index=False)
    with pytest.raises(DataError, match=message):
        ingest(manifest, 16)


def test_an_image_folder_s_subfolders_below_a_class_are_its_sources(tmp_path: Path) -> None:
    """Issue item 3: sources from the folder an image sits in below its class folder."""
    for index, relative in enumerate(
        ["COVID/site a/1.png", "COVID/site b/2.png", "Normal/site a/3.png", "Normal/4.png"]
    ):
        write_png(tmp_path / "data" / relative, distinct_pixels(3000 + index))
    result = ingest(tmp_path / "data", 16, cache_dir=tmp_path / "cache")
    assert result.dataset.sources == ("site a", "site b", "", "site a")
    assert result.report.sources == 2


def four_scans(root: Path) -> None:
    for index in range(4):
        write_png(root / "scans" / f"{index}.png", distinct_pixels(2000 + index))


def test_a_utf8_manifest_reads_with_or_without_a_byte_order_mark(tmp_path: Path) -> None:
    """Issue item 2: spreadsheet programs write UTF-8 with a BOM; both forms read."""
    four_scans(tmp_path)
    text = "path,label,source\n" + "".join(
        f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'},Hôpital Sud\n" for i in range(4)
    )
    for name, prefix in (("plain.csv", b""), ("bom.csv", b"\xef\xbb\xbf")):
        (tmp_path / name).write_bytes(prefix + text.encode("utf-8"))
        result = ingest(tmp_path / name, 16, cache_dir=tmp_path / "cache")
        assert result.dataset.class_counts() == {"COVID": 2, "Normal": 2}
        assert set(result.dataset.sources) == {"Hôpital Sud"}


def test_a_latin1_manifest_names_its_line_unless_the_encoding_is_given(tmp_path: Path) -> None:
    """Issue item 2: another encoding is a clear error naming the line, or reads when named."""
    four_scans(tmp_path)
    lines = ["path,label,source"]
    lines += [f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'},site" for i in range(3)]
    lines.append("scans/3.png,Normal,Hôpital Sud")
    manifest = tmp_path / "latin.csv"
    manifest.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"line 5 is not UTF-8 text .*--manifest-encoding"):
        ingest(manifest, 16, cache_dir=tmp_path / "cache")
    result = ingest(manifest, 16, manifest_encoding="latin-1", cache_dir=tmp_path / "cache")
    assert "Hôpital Sud" in result.dataset.sources
    with pytest.raises(DataError, match="unknown manifest encoding 'klingon'"):
        ingest(manifest, 16, manifest_encoding="klingon", cache_dir=tmp_path / "cache")


def test_manifest_columns_match_loosely_and_paths_may_be_absolute(tmp_path: Path) -> None:
    """Issue item 2: `Patient ID`, `patientid`, `patient_id`; absolute or CSV-relative paths."""
    four_scans(tmp_path)
    absolute = (tmp_path / "scans" / "3.png").resolve()
    for header in ("Path, Label ,Patient ID", "PATH,label,patientid", "path,LABEL,patient_id"):
        manifest = tmp_path / "lists" / "m.csv"
        manifest.parent.mkdir(exist_ok=True)
        manifest.write_text(
            f"{header}\n../scans/0.png,COVID,p1\n../scans/1.png,COVID,p1\n"
            f"../scans/2.png,Normal,p2\n{absolute},Normal,p3\n"
        )
        dataset = ingest(manifest, 16, cache_dir=tmp_path / "cache").dataset
        assert dataset.patients == ("p1", "p1", "p2", "p3")
        assert dataset.paths[-1] == absolute.as_posix()
    manifest.write_text("path,label,Patient ID,patient_id\nscans/0.png,COVID,p,p\n")
    with pytest.raises(DataError, match="given twice"):
        ingest(manifest, 16, cache_dir=tmp_path / "cache")


def test_manifest_rows_without_a_label_are_listed_and_left_out(tmp_path: Path) -> None:
    """Issue item 2: an empty label is never guessed."""
    four_scans(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label\nscans/0.png,COVID\nscans/1.png,\nscans/2.png,Normal\nscans/3.png, \n"
    )
    for _ in range(2):  # the second read comes from the cache
        result = ingest(manifest, 16, cache_dir=tmp_path / "cache")
        assert result.dataset.paths == ("scans/0.png", "scans/2.png")
        assert result.report.notes == ["m.csv: 2 row(s) with an empty label left out, line(s) 3, 5"]


def test_a_manifest_row_whose_file_is_missing_is_named_by_line_and_follows_bad_image_rules(
    tmp_path: Path,
) -> None:
    """Issue item 2: refused (listed with the line) unless --skip-bad-images."""
    four_scans(tmp_path)
    manifest = tmp_path / "m.csv"
    rows = [f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'}" for i in range(4)]
    manifest.write_text("path,label\n" + "\n".join([*rows, "scans/gone.png,Normal"]) + "\n")
    with pytest.raises(DataError, match=r"scans/gone.png: file not found \(manifest line 6\)"):
        ingest(manifest, 16, cache_dir=tmp_path / "cache")
    result = ingest(manifest, 16, skip_bad_images=True, cache_dir=tmp_path / "cache")
    assert result.report.skipped == 1 and len(result.dataset.paths) == 4


def test_a_label_spelled_unlike_its_class_is_named_by_line_and_follows_bad_image_rules(
    tmp_path: Path,
) -> None:
    """Issue item 2: `covid` beside `COVID` matches no class: refused or skipped, not merged."""
    for index in range(6):
        write_png(tmp_path / "scans" / f"{index}.png", distinct_pixels(4000 + index))
    manifest = tmp_path / "m.csv"
    labels = ["COVID", "COVID", "covid", "Normal", "Normal", "NORMAL"]
    rows = [f"scans/{i}.png,{label}" for i, label in enumerate(labels)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as refused:
        ingest(manifest, 16, cache_dir=tmp_path / "cache")
    message = str(refused.value)
    assert "scans/2.png: label 'covid' matches no class" in message
    assert "(manifest line 4)" in message and "(manifest line 7)" in message
    result = ingest(manifest, 16, skip_bad_images=True, cache_dir=tmp_path / "cache")
    assert result.dataset.class_counts() == {"COVID": 2, "Normal": 2}
    assert result.report.skipped == 2


def make_folder_with_bad_files(root: Path) -> Path:
    for class_offset, class_name in enumerate(("COVID", "Normal")):
        for index in range(3):
            # Fixed seeds: str hashes change per process and could give both classes one image.
            write_png(
                root / class_name / f"{index}.png", distinct_pixels(10 * class_offset + index)
            )
    good = root / "COVID" / "good.png"
    write_png(good, distinct_pixels(500))
    (root / "COVID" / "corrupt.png").write_bytes(good.read_bytes()[:40] + b"\0" * 60)
    buffer = root / "Normal" / "truncated.jpg"
    Image.fromarray(distinct_pixels(501, 64)).save(buffer, quality=90)
    buffer.write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    (root / "Normal" / "notes.png").write_text("this is a text file, renamed")
    return root


def test_every_bad_file_is_listed_with_its_reason_and_nothing_is_trained(tmp_path: Path) -> None:
    root = make_folder_with_bad_files(tmp_path / "data")
    with pytest.raises(DataError, match="3 file") as error:
        ingest(root, 16)
    message = str(error.value)
    for name in ("corrupt.png", "truncated.jpg", "notes.png"):
        assert name in message
    assert "--skip-bad-images" in message


def test_bad_files_can_be_skipped_and_are_reported(tmp_path: Path) -> None:
    root = make_folder_with_bad_files(tmp_path / "data")
    result = ingest(root, 16, skip_bad_images=True)
    assert result.report.skipped == 3
    assert sorted(bad["path"] for bad in result.report.bad_files) == [
        "COVID/corrupt.png",
        "Normal/notes.png",
        "Normal/truncated.jpg",
    ]
    assert not any(
        name in path for path in result.dataset.paths for name in ("corrupt", "truncated", "notes")
    )
    assert "Unreadable files (skipped): 3" in result.report.to_text()


def test_a_cached_dataset_still_refuses_its_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder_with_bad_files(tmp_path / "data")
    ingest(root, 16, skip_bad_images=True)
    monkeypatch.setattr(data, "read_gray", lambda path: pytest.fail("decoded again"))
    with pytest.raises(DataError, match="3 file"):
        ingest(root, 16)


def test_images_over_the_decompression_bomb_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_png(tmp_path / "big.png", distinct_pixels(1, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        read_gray(path)


def test_cmyk_images_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).convert("CMYK").save(path, quality=95)
    gray, mode = read_gray(path)
    assert mode == "CMYK"
    assert abs(int(np.asarray(gray).mean()) - 200) <= 3


def test_exact_duplicates_across_classes_stop_ingest_naming_both(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 3})
    (root / "Normal" / "copy.png").write_bytes((root / "COVID" / "001.png").read_bytes())
    with pytest.raises(DataError, match="two labels") as error:
        ingest(root, 16)
    assert "COVID/001.png (COVID)" in str(error.value)
    assert "Normal/copy.png (Normal)" in str(error.value)


def test_conflicting_duplicates_can_be_dropped(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 3})
    (root / "Normal" / "copy.png").write_bytes((root / "COVID" / "001.png").read_bytes())
    result = ingest(root, 16, drop_conflicting_duplicates=True)
    assert result.report.dropped_conflicting == 2
    assert "COVID/001.png" not in result.dataset.paths
    assert result.dataset.class_counts() == {"COVID": 2, "Normal": 3}


def test_duplicates_within_a_class_are_counted_and_share_a_hash(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 3})
    # The same picture saved again, as a JPEG-free re-encode: equal decoded content.
    Image.open(root / "COVID" / "000.png").save(root / "COVID" / "again.png", compress_level=9)
    result = ingest(root, 16)
    assert result.report.duplicate_sets == 1 and result.report.duplicate_images == 2
    hashes = dict(zip(result.dataset.paths, result.dataset.hashes, strict=True))
    assert hashes["COVID/000.png"] == hashes["COVID/again.png"]


def test_dicom_files_are_ingested_beside_pngs(tmp_path: Path) -> None:
    from tests.trainables.test_dicom import write_dicom

    root = tmp_path / "data"
    for index in range(2):
        write_png(root / "Normal" / f"{index}.png", distinct_pixels(index))
        ramp = (np.arange(32 * 32).reshape(32, 32) * (index + 1)).astype(np.uint16)
        (root / "COVID").mkdir(parents=True, exist_ok=True)
        write_dicom(root / "COVID" / f"{index}.dcm", ramp)
    result = ingest(root, 16)
    assert result.dataset.class_counts() == {"COVID": 2, "Normal": 2}
    assert result.report.modes["DICOM"] == 2
    assert result.report.transfer_syntaxes == {"Explicit VR Little Endian": 2}


def test_compressed_dicom_is_ingested_and_counted_per_transfer_syntax(tmp_path: Path) -> None:
    """Issue item 1: the ingest report and `data inspect` count images per transfer syntax."""
    import shutil

    from pydicom.data import get_testdata_file

    root = tmp_path / "data"
    compressed = {
        # The MR_small files hold one picture in four encodings: lossless, so equal pixels.
        "COVID": [
            "MR_small_RLE.dcm",
            "MR_small_jp2klossless.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_bigendian.dcm",
        ],
        "Normal": ["JPGExtended.dcm", "image_dfl.dcm"],
    }
    for class_name, names in compressed.items():
        (root / class_name).mkdir(parents=True)
        for name in names:
            shutil.copy(str(get_testdata_file(name)), root / class_name / name)
    result = ingest(root, 16, cache_dir=tmp_path / "cache")
    assert result.dataset.class_counts() == {"COVID": 4, "Normal": 2}
    assert result.report.duplicate_sets == 1 and result.report.duplicate_images == 4
    assert result.report.transfer_syntaxes == {
        "RLE Lossless": 1,
        "JPEG 2000 Image Compression (Lossless Only)": 1,
        "JPEG Extended (Process 2 and 4)": 1,
        "JPEG-LS Lossless Image Compression": 1,
        "Explicit VR Big Endian": 1,
        "Deflated Explicit VR Little Endian": 1,
    }
    text = result.report.to_text()
    assert "DICOM transfer syntaxes:" in text and "  RLE Lossless: 1" in text
    cached = ingest(root, 16, cache_dir=tmp_path / "cache")
    assert cached.report.transfer_syntaxes == result.report.transfer_syntaxes


def test_a_manifest_with_patients_spanning_many_images_splits_without_leaks(
    tmp_path: Path,
) -> None:
    from cxrtune.trainables.splits import group_ids, make_splits

    rng = np.random.default_rng(1)
    rows = []
    for patient in range(60):
        label = ["COVID", "Normal", "Pneumonia"][patient % 3]
        for image in range(int(rng.integers(1, 6))):
            rows.append(
                {
                    "path": f"p{patient}/{image}.png",
                    "label": label,
                    "patient_id": f"patient {patient}",
                }
            )
    dataset = ingest(write_manifest(tmp_path, rows), 16).dataset
    splits = make_splits(
        dataset, group_ids(dataset, "patient"), val_fraction=0.15, test_fraction=0.15, seed=0
    )
    split_of_patient: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        for index in splits.of(split):
            split_of_patient.setdefault(dataset.patients[index], set()).add(split)
    assert len(split_of_patient) == 60
    assert all(len(splits_seen) == 1 for splits_seen in split_of_patient.values())


def manifest_with_a_copy_across_splits(root: Path) -> Path:
    """Two classes, 4 images of each per split, and test/copy.png a copy of train/0.png."""
    rows = [
        {"path": f"{split}/{index}.png", "label": ("COVID", "Normal")[index % 2], "split": split}
        for split in ("train", "val", "test")
        for index in range(8)
    ]
    rows.append({"path": "test/copy.png", "label": "COVID", "split": "test"})
    manifest = write_manifest(root, rows)
    (root / "test" / "copy.png").write_bytes((root / "train" / "0.png").read_bytes())
    return manifest


def test_one_image_in_two_splits_of_a_manifest_is_refused_or_dropped(tmp_path: Path) -> None:
    """Item 4: refused naming both paths; --drop-conflicting-duplicates leaves both out."""
    manifest = manifest_with_a_copy_across_splits(tmp_path)
    with pytest.raises(DataError, match="in two splits of the manifest's split column") as error:
        ingest(manifest, 16)
    assert "train/0.png (train) == test/copy.png (test)" in str(error.value)
    assert "--drop-conflicting-duplicates" in str(error.value)
    result = ingest(manifest, 16, drop_conflicting_duplicates=True)
    assert result.report.dropped_conflicting == 2
    assert result.report.split_conflicts == [["train/0.png (train)", "test/copy.png (test)"]]
    assert "Images in two splits of the manifest: 1" in result.report.to_text()
    assert {"train/0.png", "test/copy.png"}.isdisjoint(result.dataset.paths)
    dataset = result.dataset
    splits = make_splits(
        dataset, group_ids(dataset, "patient"), val_fraction=0.15, test_fraction=0.15, seed=0
    )
    assert len(splits.train) == 7 and len(splits.test) == 8
