from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtune.trainables import data
from cxrtune.trainables.data import (
    DataError,
    Dataset,
    decode_image,
    find_positive_class,
    ingest,
)
from tests.conftest import write_png


def load_image_folder(root: Path, size: int) -> tuple[Dataset, Path]:
    result = ingest(root, size, layout="imagefolder")
    return result.dataset, result.cache_path


def test_an_image_folder_becomes_uint8_n_by_1_by_h_by_w(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 5})
    dataset, _ = load_image_folder(root, 16)
    assert dataset.images.shape == (8, 1, 16, 16)
    assert dataset.images.dtype == np.uint8
    assert dataset.class_names == ("COVID", "Normal")
    assert dataset.class_counts() == {"COVID": 3, "Normal": 5}
    assert dataset.paths[0] == "COVID/000.png"


def test_nested_folders_spaces_and_jpegs_are_found(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_png(root / "Viral Pneumonia" / "site a" / "x 1.png", np.full((20, 20), 100, np.uint8))
    Image.fromarray(np.full((20, 20), 150, np.uint8)).save(root / "Viral Pneumonia" / "y.JPEG")
    write_png(root / "COVID-19" / "deep" / "er" / "z.png", np.full((20, 20), 200, np.uint8))
    (root / "COVID-19" / "notes.txt").write_text("not an image")
    write_png(root / "COVID-19" / ".hidden" / "skip.png", np.zeros((20, 20), np.uint8))
    dataset, _ = load_image_folder(root, 8)
    assert sorted(dataset.paths) == [
        "COVID-19/deep/er/z.png",
        "Viral Pneumonia/site a/x 1.png",
        "Viral Pneumonia/y.JPEG",
    ]


def gradient(size: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 255, size), (size, 1)).astype(np.uint8)


def test_rgb_images_become_their_luminance(tmp_path: Path) -> None:
    rgb = np.stack([gradient()] * 3, axis=-1)
    path = write_png(tmp_path / "rgb.png", rgb)
    assert np.abs(decode_image(path, 32).astype(int) - gradient().astype(int)).max() <= 1


def test_sixteen_bit_images_are_stretched_not_clipped(tmp_path: Path) -> None:
    # A 12-bit X-ray stored in 16 bits: clipping to 8 bits would make it all white.
    values = (np.tile(np.linspace(0, 4095, 32), (32, 1))).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    decoded = decode_image(path, 32)
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.abs(decoded.astype(int) - gradient().astype(int)).max() <= 2


def test_transparent_pixels_become_black(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 8:, 3] = 255
    path = write_png(tmp_path / "rgba.png", rgba)
    decoded = decode_image(path, 16)
    assert decoded[:, :7].max() == 0 and decoded[:, 9:].min() == 200


def test_palette_images_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(gradient()).convert("P").save(path)
    assert np.abs(decode_image(path, 32).astype(int) - gradient().astype(int)).max() <= 8


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = decode_image(path, 40)
    assert decoded[:10].mean() > 200 and decoded[-10:].mean() < 50  # white half now on top


def test_the_cache_is_reused_without_decoding_again(
    make_image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder({"COVID": 2, "Normal": 2})
    first, cache_path = load_image_folder(root, 16)
    monkeypatch.setattr(data, "read_gray", lambda *args: pytest.fail("decoded again"))
    second, second_path = load_image_folder(root, 16)
    assert second_path == cache_path
    assert np.array_equal(first.images, second.images)
    assert first.paths == second.paths


@pytest.mark.parametrize("change", ["touch", "add", "remove", "resolution"])
def test_the_cache_is_invalidated_when_the_data_or_resolution_change(
    make_image_folder: Callable[..., Path], change: str
) -> None:
    root = make_image_folder({"COVID": 2, "Normal": 2})
    _, before = load_image_folder(root, 16)
    size = 16
    victim = root / "Normal" / "000.png"
    if change == "touch":
        stat = victim.stat()
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "add":
        write_png(root / "Normal" / "new.png", np.zeros((8, 8), dtype=np.uint8))
    elif change == "remove":
        victim.unlink()
    else:
        size = 24
    dataset, after = load_image_folder(root, size)
    assert after != before
    assert dataset.images.shape[-1] == size


def test_the_cache_file_is_written_atomically(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder({"COVID": 2, "Normal": 2})
    _, cache_path = load_image_folder(root, 16)
    assert [p.name for p in cache_path.parent.iterdir()] == [cache_path.name]


def test_a_single_class_is_an_error(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder({"COVID": 3})
    with pytest.raises(DataError, match="at least 2"):
        load_image_folder(root, 16)


def test_an_empty_class_is_an_error_naming_it(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 3})
    (root / "Lung_Opacity").mkdir()
    with pytest.raises(DataError, match="Lung_Opacity"):
        load_image_folder(root, 16)


def test_every_unreadable_image_is_listed(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder({"COVID": 3, "Normal": 3})
    (root / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "Normal" / "text.png").write_text("hello")
    with pytest.raises(DataError, match="2 file") as error:
        load_image_folder(root, 16)
    assert "broken.png" in str(error.value) and "text.png" in str(error.value)


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nowhere", 16)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("COVID", "Normal"), 0),
        (("Normal", "covid"), 1),
        (("Lung_Opacity", "COVID-19", "Normal"), 1),
        (("covid19", "Normal"), 0),
    ],
)
def test_the_positive_class_matches_common_spellings(names: tuple[str, ...], expected: int) -> None:
    assert find_positive_class(names, "COVID") == expected


def test_a_missing_positive_class_is_an_error_listing_the_classes() -> None:
    with pytest.raises(DataError, match=r"no class matches.*Normal"):
        find_positive_class(("Normal", "Pneumonia"), "COVID")


def test_a_16_bit_image_is_stretched_by_lookup_exactly_as_by_the_float_formula() -> None:
    """Performance item: the lookup table gives the float formula's pixels, offset range too."""
    from cxrtune.trainables.data import _stretch_to_8_bits

    values = np.random.default_rng(0).integers(300, 4000, (40, 30)).astype(np.uint16)
    low, high = float(values.min()), float(values.max())
    expected = np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)
    assert np.array_equal(_stretch_to_8_bits(values), expected)
    assert not _stretch_to_8_bits(np.full((3, 3), 7, dtype=np.uint16)).any()


@pytest.mark.parametrize(
    ("name", "mode"), [("sixteen.png", "I;16"), ("sixteen big-endian.tif", "I;16B")]
)
def test_a_16_bit_file_of_either_byte_order_is_stretched_to_the_float_formula_pixels(
    tmp_path: Path, name: str, mode: str
) -> None:
    """A 16-bit PNG (Pillow's I;16) and a big-endian 16-bit TIFF (I;16B) read alike."""
    from cxrtune.trainables.data import read_gray

    values = np.random.default_rng(1).integers(300, 4000, (40, 30)).astype(np.uint16)
    path = tmp_path / name
    Image.frombytes("I;16B", (30, 40), values.astype(">u2").tobytes()).save(path)
    low, high = float(values.min()), float(values.max())
    expected = np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)
    gray, source_mode = read_gray(path)
    assert source_mode == mode
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), expected)
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((5, 4), 900, dtype=np.uint16)).save(flat)
    assert not np.asarray(read_gray(flat)[0]).any()


def test_readable_images_are_compacted_in_place_in_their_order() -> None:
    """Performance item: no second copy of the decoded array when some files failed."""
    from cxrtune.trainables.data import _compact

    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(2, axis=2)
    kept = _compact(images, np.array([0, 2, 3, 5]))
    assert kept.base is images or kept.base is images.base
    assert kept[:, 0, 0, 0].tolist() == [0, 2, 3, 5]
    assert _compact(images, np.arange(4)).shape[0] == 4
