"""DICOM decoding for ingest: one ``.dcm`` file becomes a uint8 grayscale array.

This module owns everything DICOM-specific between the file on disk and the 8-bit
image that ingest resizes and caches: reading with pydicom (the pylibjpeg plugins add JPEG
Lossless, JPEG extended, JPEG-LS, JPEG 2000 and RLE), picking the first frame, palette
and colour to luminance, the modality LUT (rescale) and the VOI LUT or window, scaling
to 0..255 and inverting MONOCHROME1. Resizing, caching and error collection stay
with the caller, which also adds the file's path to a :class:`DicomError` message.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["DicomError", "decode_dicom", "read_dicom"]

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
YBR_TO_RGB = frozenset({"YBR_FULL", "YBR_FULL_422"})
# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so DICOM and PNG colour agree.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# What pydicom raises while decoding or transforming pixels when the file is at fault
# (missing elements, bad values, no decoder plugin); anything else is a bug and propagates.
PIXEL_ERRORS = (
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)
# pydicom converts element values lazily, on first access, so a corrupt element can raise
# these (plus the above) anywhere after dcmread, not only while parsing the file.
CORRUPT_ERRORS = (*PIXEL_ERRORS, EOFError, struct.error, BytesLengthException)

VoiKind = Literal["lut", "window"]


class DicomError(ValueError):
    """A DICOM file cannot be turned into an image; the message says why (without the path)."""


def decode_dicom(path: str | Path) -> np.ndarray:
    """The pixel data of a DICOM file as a uint8 (rows, columns) grayscale array."""
    return read_dicom(path)[0]


def read_dicom(path: str | Path) -> tuple[np.ndarray, str]:
    """The pixel data of a DICOM file as uint8 (rows, columns), and its transfer syntax's name.

    Takes the first frame; palette colour and colour become ITU-R 601 luminance.
    Monochrome pixels go through the modality LUT (rescale) and then the first VOI LUT
    or window, whose output range maps to 0..255 (below the window 0, above 255);
    without a VOI LUT or window the image's own min..max is stretched to 0..255 (a
    constant image is all 0). MONOCHROME1 is inverted so that, as in MONOCHROME2, bone
    is bright. Raises DicomError when the file is not DICOM or its pixels cannot be
    decoded; OSError (unreadable file) propagates unchanged.
    """
    dataset = _read(path)
    syntax = _transfer_syntax(dataset)
    try:
        pixels, photometric = _first_frame(dataset, syntax)
        if photometric in MONOCHROME:
            unit = _monochrome_to_unit(pixels, dataset)
        elif photometric == "PALETTE COLOR":
            unit = _stretch(_luminance(_palette_to_rgb(pixels, dataset), "RGB"))
        else:
            unit = _stretch(_luminance(pixels, photometric))
    except DicomError:
        raise
    except CORRUPT_ERRORS as error:
        raise DicomError(f"corrupt DICOM data: {_one_line(error)}") from error
    image = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        image = 255 - image
    if image.ndim != 2:
        raise DicomError(f"pixel data has shape {image.shape}, expected (rows, columns)")
    return np.ascontiguousarray(image), str(syntax.name)


def _read(path: str | Path) -> Dataset:
    """Parse the file with pydicom, refusing anything without a DICOM header."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise DicomError("not a DICOM file (no DICOM header or 'DICM' prefix)") from error
    except CORRUPT_ERRORS as error:
        raise DicomError(f"DICOM file cannot be parsed: {_one_line(error)}") from error


def _transfer_syntax(dataset: Dataset) -> UID:
    """The file's transfer syntax; without one in the file meta, the encoding pydicom parsed.

    Refuses a file without pixel data, naming what it is instead (an RT plan, an SR
    document), since its SOP class says so.
    """
    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        kind = dataset.get("SOPClassUID")
        described = f" ({UID(str(kind)).name})" if kind else ""
        raise DicomError(f"no pixel data{described}")
    syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax:
        return UID(str(syntax))
    # An uncompressed file whose meta lost the element still parsed, so its encoding is known.
    implicit, little_endian = dataset.original_encoding
    if implicit is None or little_endian is None:
        raise DicomError("no transfer syntax in the file meta information")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian


def _first_frame(dataset: Dataset, syntax: UID) -> tuple[np.ndarray, str]:
    """Decode only the first frame; return it with the photometric interpretation it is in."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise DicomError(f"unsupported transfer syntax {syntax.name}") from error
    try:
        # raw=True keeps the decoded colour space, and the returned properties say which
        # one it is: decoders may already have converted (e.g. JPEG 2000 YBR_ICT to RGB).
        pixels, properties = decoder.as_array(
            dataset, index=0, raw=True, **as_pixel_options(dataset)
        )
    except PIXEL_ERRORS as error:
        raise DicomError(f"cannot decode {syntax.name} pixel data: {_one_line(error)}") from error
    photometric = str(
        properties.get("photometric_interpretation", dataset.get("PhotometricInterpretation", ""))
    )
    return pixels, photometric


def _palette_to_rgb(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Palette indices through the file's red, green and blue lookup tables."""
    try:
        return np.asarray(apply_color_lut(pixels, dataset))
    except PIXEL_ERRORS as error:
        raise DicomError(f"cannot apply the palette colour LUT: {_one_line(error)}") from error


def _luminance(pixels: np.ndarray, photometric: str) -> np.ndarray:
    """ITU-R 601 luminance of an RGB or YBR_FULL frame."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(f"unsupported photometric interpretation {photometric!r}")
    if photometric in YBR_TO_RGB:
        try:
            pixels = convert_color_space(pixels, photometric, "RGB")
        except PIXEL_ERRORS as error:
            raise DicomError(f"cannot convert {photometric} to RGB: {_one_line(error)}") from error
    elif photometric != "RGB":
        raise DicomError(f"unsupported colour space {photometric!r}")
    return np.asarray(pixels, dtype=np.float64) @ LUMA_WEIGHTS


def _monochrome_to_unit(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, as floats with the displayed range at 0..1."""
    try:
        values = apply_modality_lut(pixels, dataset)
        kind = _voi_kind(dataset)
        if kind is None:
            return _stretch(values)
        if kind == "lut":
            values, low, high = _voi_lut_inputs(values, dataset)
        else:
            # pydicom's windowing sends values below the window to y_min and above it
            # to y_max, where y_min..y_max is the stored range (2**BitsStored) passed
            # through the rescale; probing with -inf/+inf reads those two ends off
            # pydicom itself, whatever the rescale sign or VOI LUT Function.
            low, high = apply_voi_lut(np.array([-np.inf, np.inf]), dataset, index=0)
        shown = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
    except PIXEL_ERRORS as error:
        raise DicomError(f"cannot apply the modality or VOI LUT: {_one_line(error)}") from error
    if high == low:
        return np.zeros_like(shown)
    return (shown - float(low)) / (float(high) - float(low))


def _voi_kind(dataset: Dataset) -> VoiKind | None:
    """Which transform apply_voi_lut will pick: a usable VOI LUT beats a window."""
    sequence = dataset.get("VOILUTSequence")
    if sequence:
        first = sequence[0]
        if first.get("LUTDescriptor") is not None and first.get("LUTData") is not None:
            return "lut"
    if dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        return "window"
    return None


def _voi_lut_inputs(values: np.ndarray, dataset: Dataset) -> tuple[np.ndarray, float, float]:
    """Clamp LUT inputs to the LUT's domain; also return the lowest and highest LUT output."""
    entries, first_mapped = dataset.VOILUTSequence[0].LUTDescriptor[:2]
    entries = entries or 2**16
    # The standard clamps inputs outside the LUT to its first/last entry anyway; clamping
    # here, as integers, keeps pydicom 3.0.2 from wrapping inputs wider than the LUT's
    # entry type and from warning about float input after a rescale.
    rounded = np.rint(np.asarray(values, dtype=np.float64))
    inputs = np.clip(rounded, first_mapped, first_mapped + entries - 1).astype(np.int64)
    outputs = apply_voi_lut(np.arange(first_mapped, first_mapped + entries), dataset, index=0)
    return inputs, float(outputs.min()), float(outputs.max())


def _stretch(values: np.ndarray) -> np.ndarray:
    """The image's own min..max mapped to 0..1; a constant image is all 0."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, for a short error reason."""
    return " ".join(str(error).split()) or type(error).__name__
