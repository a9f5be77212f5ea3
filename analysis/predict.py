"""Predict image files with an exported model: one row per image, unreadable files apart.

Each file is decoded exactly as ingest decoded the training images (``read_gray``,
then ``resize`` to the model's image size), so a model sees what it was trained on.
A file that cannot be read is reported with the reason and never stops the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cxrtune.analysis.export import ExportedModel
from cxrtune.trainables.data import DECODE_ERRORS, DataError, decode_image, read_error_reason
from cxrtune.trainables.dicom import DicomError
from cxrtune.trainables.layouts import images_under

__all__ = ["find_images", "predict_paths", "prediction_table"]

BadFile = tuple[str, str]  # path, reason


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[BadFile]]:
    """The files named, and the PNG, JPEG and DICOM files below the folders named.

    Folders are searched recursively, in sorted order, skipping hidden files and
    folders as ingest does. A file named directly is taken whatever its suffix; an
    input that does not exist is reported as a bad file.
    """
    found: list[Path] = []
    bad: list[BadFile] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found += images_under(entry)
        elif entry.is_file():
            found.append(entry)
        else:
            bad.append((str(entry), "file not found"))
    return found, bad


def predict_paths(
    model: ExportedModel, inputs: Sequence[str | Path]
) -> tuple[pd.DataFrame, list[BadFile]]:
    """Predict every image in ``inputs`` (files or folders); see ``prediction_table`` for the rows.

    Returns the table of the images that could be read, and ``(path, reason)`` for
    each that could not.
    """
    paths, bad = find_images(inputs)

    def decode(path: Path) -> np.ndarray | str:
        try:
            return decode_image(path, model.image_size)
        except (*DECODE_ERRORS, DicomError, DataError) as error:
            return read_error_reason(error)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, paths))
    good: list[Path] = []
    images: list[np.ndarray] = []
    for path, result in zip(paths, decoded, strict=True):
        if isinstance(result, str):
            bad.append((str(path), result))
        else:
            good.append(path)
            images.append(result[np.newaxis])
    size = model.image_size
    stacked = np.stack(images) if images else np.zeros((0, 1, size, size), dtype=np.uint8)
    return prediction_table(model, good, model.predict_proba(stacked)), bad


def prediction_table(
    model: ExportedModel, paths: Sequence[Path], probabilities: np.ndarray
) -> pd.DataFrame:
    """One row per image: ``path``, one probability column per class (named by the class),
    ``predicted_class`` (the most probable) and ``covid_call`` (the positive class's
    probability is at least the model's threshold).
    """
    table = pd.DataFrame({"path": [str(path) for path in paths]})
    for index, name in enumerate(model.class_names):
        table[name] = probabilities[:, index]
    names = np.array(model.class_names, dtype=object)
    table["predicted_class"] = names[probabilities.argmax(axis=1)]
    table["covid_call"] = probabilities[:, model.positive_index] >= model.threshold
    return table
