"""Export a trained model, or an ensemble of the top trials, as one folder a user can copy.

The folder holds one ``state_dict`` file per member (tensors only, so it loads with
``torch.load(weights_only=True)``) and ``model.json``, which says everything else a
prediction needs and nothing refers back to the experiment dir:

- ``format_version``: ``FORMAT_VERSION``; a newer one is refused on load;
- ``members``: per trial, ``trial_id``, ``family``, ``rank``, ``best_epoch``,
  ``checkpoint`` (relative to the experiment), ``config`` (the ``TrialConfig`` dict),
  ``weights`` (file name) and ``sha256`` (of the weights file);
- ``class_names``, ``positive_class``;
- ``preprocessing``: ``image_size``, ``grayscale_mean``, ``grayscale_std``;
- ``combine``: how member probabilities become one (the mean);
- ``threshold``: call the positive class when its probability is at least this;
  ``null`` when no threshold reached ``target_specificity`` on val (call nothing);
- ``target_specificity``, ``metrics`` (val and test numbers; ``null`` where undefined)
  and ``source`` (experiment, selection, data).

A single model keeps its leaderboard row's threshold and metrics. An ensemble's
threshold is chosen on its averaged val probabilities, and its test metrics are
computed from its averaged test probabilities, exactly as the leaderboard computes
a trial's (``held_out_metrics``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrtune.analysis.experiment import RESULTS_FILE, Experiment, read_experiment
from cxrtune.analysis.leaderboard import (
    TEST_COLUMNS,
    Leaderboard,
    build_leaderboard,
    ensemble_metrics,
)
from cxrtune.analysis.storage import unsafe_path_reason
from cxrtune.trainables.checkpoints import NOT_TENSORS, model_from_checkpoint
from cxrtune.trainables.config import ConfigError, TrialConfig
from cxrtune.trainables.engine import evaluate
from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD, create_model

__all__ = [
    "FORMAT_VERSION",
    "MODEL_FILE",
    "ExportError",
    "ExportedModel",
    "export_model",
    "load_exported",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
COMBINE = "mean of the members' class probabilities"
METRIC_KEYS = (
    "val_covid_recall",
    "val_macro_auc",
    *(column for column in TEST_COLUMNS if column != "threshold"),
)
REQUIRED_KEYS = ("format_version", "members", "class_names", "positive_class", "preprocessing")
REQUIRED_MEMBER_KEYS = ("trial_id", "config", "weights")


class ExportError(ValueError):
    """A model cannot be exported, or an exported folder cannot be read; the message says why."""


@dataclass(frozen=True)
class ExportedModel:
    """An exported model loaded for prediction: its members and what ``model.json`` says."""

    directory: Path
    members: tuple[nn.Module, ...]  # in eval mode; Grad-CAM needs the modules themselves
    class_names: tuple[str, ...]
    positive_index: int
    threshold: float  # inf when no threshold reached the target specificity: call nothing
    image_size: int
    description: dict[str, Any]  # model.json as read

    @property
    def positive_class(self) -> str:
        return self.class_names[self.positive_index]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``N x C`` (float64) of uint8 ``N x 1 x S x S`` images.

        ``S`` is the model's image size. The members' probabilities are averaged.
        Images must already be decoded and resized as training did (``read_gray``
        then ``resize``).
        """
        expected = (1, self.image_size, self.image_size)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must be uint8 N x {' x '.join(map(str, expected))}, "
                f"got {images.dtype} {images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)))
        return np.mean([_probabilities(member, images) for member in self.members], axis=0)


def _probabilities(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's probabilities through ``evaluate``, the very code that scored val and test."""
    device = next(model.parameters()).device
    # torch wraps only writable arrays; arrays read from PIL images are not.
    batch = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)
    # evaluate also returns a loss; the labels only feed that loss, which is not used here.
    unused_labels = torch.zeros(len(images), dtype=torch.long, device=device)
    _, probabilities = evaluate(model, batch, unused_labels)
    return probabilities


def export_model(
    experiment_dir: str | Path,
    out_dir: str | Path,
    *,
    trial_id: str | None = None,
    rank: int | None = None,
    ensemble: int | None = None,
) -> Path:
    """Write the model of one trial, or the ensemble of the top ``ensemble`` trials, to ``out_dir``.

    Exactly one of ``trial_id``, ``rank`` (1-based leaderboard rank) and ``ensemble``
    is given. The folder appears whole or not at all; an existing ``out_dir`` that is
    not empty is a ``FileExistsError``. An unknown trial id, a failed trial or a rank
    out of range is an ``ExportError`` naming the known ids or the count.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _refuse_non_empty(out_dir)
    experiment = read_experiment(experiment_dir)
    leaderboard = build_leaderboard(experiment)
    trial_ids, selection = _select_trials(
        leaderboard, trial_id=trial_id, rank=rank, ensemble=ensemble
    )
    # A model carries its val-chosen threshold and test metrics, so a trial below the
    # leaderboard's evaluate_top is evaluated now. An unreadable checkpoint leaves the
    # ranking, which can change the selection: select again until every member is evaluated.
    evaluated: list[str] = []
    while untested := [t for t in trial_ids if t not in leaderboard.predictions]:
        evaluated += untested
        leaderboard = build_leaderboard(experiment, evaluate_trials=evaluated)
        trial_ids, selection = _select_trials(
            leaderboard, trial_id=trial_id, rank=rank, ensemble=ensemble
        )
    description, weights = _describe(experiment, leaderboard, trial_ids)
    description["source"]["selection"] = selection
    _write_folder(out_dir, description, weights)
    return out_dir


def _select_trials(
    leaderboard: Leaderboard, *, trial_id: str | None, rank: int | None, ensemble: int | None
) -> tuple[list[str], str]:
    """The trial ids to export, best-ranked first, and the selection in words."""
    given = {"trial_id": trial_id, "rank": rank, "ensemble": ensemble}
    named = [name for name, value in given.items() if value is not None]
    if len(named) != 1:
        raise ExportError(f"give exactly one of trial_id, rank or ensemble, got {named or 'none'}")
    ranked = leaderboard.ranked.sort_values("rank")["trial_id"].astype(str).tolist()
    if trial_id is not None:
        if trial_id in ranked:
            return [trial_id], f"trial {trial_id}"
        failed = leaderboard.failed.set_index("trial_id")["error"]
        if trial_id in failed.index:
            last_line = str(failed[trial_id]).strip().splitlines()[-1]
            raise ExportError(f"trial {trial_id} failed and has no model to export: {last_line}")
        raise ExportError(f"unknown trial id {trial_id!r}; known: {', '.join(ranked) or 'none'}")
    if not ranked:
        raise ExportError("no trial of this experiment reported a result; nothing to export")
    count = rank if rank is not None else ensemble
    assert count is not None
    if not 1 <= count <= len(ranked):
        what = "rank" if rank is not None else "ensemble size"
        raise ExportError(
            f"{what} must be between 1 and {len(ranked)} (the ranked trials), got {count}"
        )
    if rank is not None:
        return [ranked[rank - 1]], f"rank {rank}"
    return ranked[:count], f"ensemble of the top {count}"


def _describe(
    experiment: Experiment, leaderboard: Leaderboard, trial_ids: list[str]
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``model.json`` (without the selection) and the state dict of each member by file name."""
    info = experiment.dataset
    rows = leaderboard.ranked.set_index("trial_id")
    target_specificity = experiment.target_specificity
    members, weights = [], {}
    image_sizes = set()
    for trial_id in trial_ids:
        checkpoint = leaderboard.checkpoints.get(trial_id)
        if checkpoint is None or not checkpoint.is_dir():
            raise ExportError(f"trial {trial_id} has no kept checkpoint to export")
        if reason := unsafe_path_reason(trial_id, folders=False):
            # The id comes from the trial's result.json and names a file of the export.
            raise ExportError(
                f"refusing trial id {trial_id!r} of {checkpoint.parent / RESULTS_FILE}: "
                f"it {reason}, so it cannot name a file in the export folder"
            )
        model, config, state = model_from_checkpoint(checkpoint)
        if list(state["class_names"]) != list(info.class_names):
            raise ExportError(
                f"{checkpoint} was trained on classes {state['class_names']}, "
                f"the experiment's data have {info.class_names}"
            )
        image_sizes.add(int(state["image_size"]))
        weights[f"{trial_id}.pt"] = model.state_dict()
        members.append(
            {
                "trial_id": trial_id,
                "family": config.family,
                "rank": int(rows.loc[trial_id, "rank"]),
                "best_epoch": int(rows.loc[trial_id, "best_epoch"]),
                "checkpoint": checkpoint.relative_to(experiment.directory).as_posix(),
                "config": config.to_dict(),
                "weights": f"{trial_id}.pt",
            }
        )
    if len(image_sizes) != 1:
        raise ExportError(f"the members were trained at different image sizes: {image_sizes}")
    if len(trial_ids) == 1:
        row = rows.loc[trial_ids[0]]
        threshold = float(row["threshold"])
        metrics = {key: float(row[key]) for key in METRIC_KEYS}
    else:
        try:
            threshold, metrics = ensemble_metrics(experiment, leaderboard, trial_ids)
        except ValueError as error:
            raise ExportError(str(error)) from error
    description = {
        "format_version": FORMAT_VERSION,
        "members": members,
        "class_names": list(info.class_names),
        "positive_class": info.positive_class,
        "preprocessing": {
            "image_size": image_sizes.pop(),
            "grayscale_mean": GRAY_MEAN,
            "grayscale_std": GRAY_STD,
        },
        "combine": COMBINE,
        "threshold": _json_number(threshold),
        "target_specificity": target_specificity,
        "metrics": {key: _json_number(value) for key, value in metrics.items()},
        "source": {
            "experiment": str(experiment.directory),
            "data": info.root,
            "synthetic_data": info.synthetic,
        },
    }
    return description, weights


def _json_number(value: float) -> float | None:
    """Strict JSON has no NaN or infinity; both become ``null``."""
    return float(value) if math.isfinite(value) else None


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")


def _write_folder(
    out_dir: Path, description: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Write into a hidden sibling folder, then rename it: a killed export leaves no half model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        for member in description["members"]:
            path = partial / member["weights"]
            torch.save(weights[member["weights"]], path)
            member["sha256"] = _sha256(path)
        text = json.dumps(description, indent=2, allow_nan=False) + "\n"
        (partial / MODEL_FILE).write_text(text)
        _refuse_non_empty(out_dir)  # again: another process may have filled it meanwhile
        if out_dir.is_dir():
            out_dir.rmdir()  # an empty folder made beforehand is taken as the place to write
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_exported(model_dir: str | Path, device: str = "cpu") -> ExportedModel:
    """Load a folder written by ``export_model``, its members in eval mode on ``device``.

    A missing or malformed ``model.json``, or a missing, altered or unloadable weights
    file, is an ``ExportError`` naming the file.
    """
    directory = Path(model_dir).expanduser()
    description = _read_description(directory / MODEL_FILE)
    class_names = tuple(str(name) for name in description["class_names"])
    image_size = int(description["preprocessing"]["image_size"])
    members = tuple(
        _load_member(directory, member, len(class_names), image_size, device)
        for member in description["members"]
    )
    threshold = description.get("threshold")
    return ExportedModel(
        directory=directory,
        members=members,
        class_names=class_names,
        positive_index=class_names.index(description["positive_class"]),
        threshold=math.inf if threshold is None else float(threshold),
        image_size=image_size,
        description=description,
    )


def _read_description(path: Path) -> dict[str, Any]:
    """``model.json``, checked for what loading needs."""
    if not path.is_file():
        raise ExportError(f"{path} not found: is this a folder written by `cxrtune export`?")
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(description, dict):
        raise ExportError(f"{path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in description]
    members = description.get("members") or [{}]
    missing += [
        f"members[].{key}" for key in REQUIRED_MEMBER_KEYS if not all(key in m for m in members)
    ]
    if missing:
        raise ExportError(f"{path} lacks {missing}")
    if description["format_version"] > FORMAT_VERSION:
        raise ExportError(
            f"{path} has format version {description['format_version']}; this cxrtune reads "
            f"up to {FORMAT_VERSION}: upgrade cxrtune"
        )
    if description["positive_class"] not in description["class_names"]:
        raise ExportError(
            f"{path}: positive class {description['positive_class']!r} is not one of "
            f"{description['class_names']}"
        )
    preprocessing = description["preprocessing"]
    trained_with = (preprocessing.get("grayscale_mean"), preprocessing.get("grayscale_std"))
    if trained_with != (GRAY_MEAN, GRAY_STD):
        # Prediction normalises with this code's constants; other ones would shift every input.
        raise ExportError(
            f"{path}: the model was trained with grayscale mean and std {trained_with}, "
            f"this cxrtune normalises with {(GRAY_MEAN, GRAY_STD)}"
        )
    return description


def _load_member(
    directory: Path, member: dict[str, Any], num_classes: int, image_size: int, device: str
) -> nn.Module:
    path = directory / Path(member["weights"]).name
    if not path.is_file():
        raise ExportError(f"weights file {path} is missing")
    expected = member.get("sha256")
    if expected is not None and _sha256(path) != expected:
        raise ExportError(f"weights file {path} is not the one exported (its sha256 differs)")
    try:
        config = TrialConfig.from_dict(member["config"])
    except ConfigError as error:
        raise ExportError(
            f"{directory / MODEL_FILE}, member {member['trial_id']}: {error}"
        ) from error
    # The weights file holds every weight, pretrained ones included.
    model = create_model(dataclasses.replace(config, weights="none"), num_classes, image_size)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except pickle.UnpicklingError as error:
        raise ExportError(f"weights file {path} cannot be loaded: {NOT_TENSORS}") from error
    except (RuntimeError, EOFError, ValueError, KeyError) as error:
        raise ExportError(f"weights file {path} cannot be loaded: {error}") from error
    return model.to(device).eval()
