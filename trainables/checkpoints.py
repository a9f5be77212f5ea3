"""The checkpoint file a trial writes each epoch, and how to read it back.

One ``checkpoint.pt`` per checkpoint directory holds the model and optimizer
state, the epoch, the random number states (the CUDA one too when the trial
uses CUDA), the fp16 loss scaler's state, the resolved ``TrialConfig`` and what
the model needs to be rebuilt (class names, image size). It contains only tensors
and builtins, so it loads with ``torch.load(weights_only=True)``.

The file is written under a temporary name and renamed into place, so a reader
never sees half of it, and ``checkpoint.sha256`` beside it (``sha256sum -c``
format) lets a reader tell a file cut short or damaged in storage from a good
one. A trial resuming from a checkpoint that fails either check falls back to
the newest earlier checkpoint of the same trial that passes (``newest_readable_state``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import posixpath
import re
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cxrtune.trainables.atomic import write_atomically
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.models import create_model

if TYPE_CHECKING:
    from ray.tune import Checkpoint

__all__ = [
    "CHECKSUM_FILE",
    "CUDA_RNG_KEY",
    "GRAD_SCALER_KEY",
    "NOT_TENSORS",
    "CheckpointCorruptError",
    "model_from_checkpoint",
    "newest_readable_state",
    "read_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"
# Keys of the checkpoint state present only when they apply.
CUDA_RNG_KEY = "cuda_rng"
GRAD_SCALER_KEY = "grad_scaler"
CHECKSUM_FILE = "checkpoint.sha256"
# Why torch.load(weights_only=True) refused a file. It is never loaded another way: a
# full unpickle of a file from elsewhere could run any code.
NOT_TENSORS = (
    "it holds more than tensors and builtins (damaged, or not written by cxrtune), "
    "and loading it fully could run code"
)
# Ray names a trial's checkpoint folders checkpoint_000000, checkpoint_000001, ...
CHECKPOINT_DIR_PATTERN = re.compile(r"^checkpoint_(\d+)$")


class CheckpointCorruptError(ValueError):
    """A checkpoint file is missing, cut short or does not match its checksum."""


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrialConfig,
    epoch: int,
    generator: torch.Generator,
    class_names: tuple[str, ...],
    image_size: int,
    metrics: dict[str, float],
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write ``directory/checkpoint.pt`` and its checksum; ``epoch`` is the epochs completed.

    ``scaler`` is the fp16 trial's loss scaler (``None`` in fp32 and bf16). An
    existing checkpoint in ``directory`` stays intact until the new one is complete.
    """
    path = directory / CHECKPOINT_FILE
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "generator": generator.get_state(),
        # Dropout draws from torch's global generator; saving it makes a resumed
        # trial continue exactly where the interrupted one stopped.
        "torch_rng": torch.get_rng_state(),
        "trial_config": config.to_dict(),
        "class_names": list(class_names),
        "image_size": image_size,
        "metrics": dict(metrics),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout on a GPU draws from the CUDA generator. Only a process that has
        # used CUDA has one worth saving; asking otherwise would start a CUDA
        # context in a CPU trial.
        state[CUDA_RNG_KEY] = torch.cuda.get_rng_state()
    if scaler is not None:
        # The scale the fp16 trial has learned: a fresh scaler would start over at
        # 2**16 and skip steps until it had backed off again.
        state[GRAD_SCALER_KEY] = scaler.state_dict()
    # Serialised in memory first, so the checksum costs no second read of the file.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    content = buffer.getvalue()
    write_atomically(path, content, durable=True)
    digest = hashlib.sha256(content).hexdigest()
    write_atomically(directory / CHECKSUM_FILE, f"{digest}  {CHECKPOINT_FILE}\n", durable=True)
    return path


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (a directory holding one is accepted too).

    Raises ``CheckpointCorruptError`` when the file is missing, does not match the
    checksum written beside it, or cannot be unpickled (checkpoints written before
    checksums existed are checked by loading alone).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointCorruptError(f"checkpoint file {path} is missing")
    content = path.read_bytes()
    checksum = path.with_name(CHECKSUM_FILE)
    if checksum.is_file():
        recorded = checksum.read_text().split()
        if not recorded or hashlib.sha256(content).hexdigest() != recorded[0]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} does not match its checksum in {checksum.name} "
                "(cut short or damaged)"
            )
    try:
        state: dict[str, Any] = torch.load(
            io.BytesIO(content), map_location=device, weights_only=True
        )
    except pickle.UnpicklingError as error:
        raise CheckpointCorruptError(
            f"checkpoint file {path} cannot be read: {NOT_TENSORS}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointCorruptError(f"checkpoint file {path} cannot be read: {error}") from error
    return state


def newest_readable_state(
    checkpoint: Checkpoint, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The state in Ray's ``checkpoint``, or in the newest earlier one of its trial that reads.

    Earlier means a sibling ``checkpoint_<index>`` folder with a lower index (the
    ones the sweep kept). Later ones are ignored while ``checkpoint`` is there, since
    Ray may never have registered them; when it is gone (deleted by the sweep's
    checkpoint retention after Ray's last snapshot of the experiment named it), the
    later ones follow, oldest first. Each one skipped is reported on stderr. Raises
    ``CheckpointCorruptError`` when none of them reads.
    """
    from ray.tune import Checkpoint

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    candidates = [checkpoint]
    if match := CHECKPOINT_DIR_PATTERN.match(name):
        siblings = sorted(_checkpoint_dirs(checkpoint.filesystem, parent))
        index = int(match.group(1))
        order = [sibling for at, sibling in reversed(siblings) if at < index]
        if not any(at == index for at, _ in siblings):
            order += [sibling for at, sibling in siblings if at > index]
        candidates += [
            Checkpoint(path=posixpath.join(parent, sibling), filesystem=checkpoint.filesystem)
            for sibling in order
        ]
    problems = []
    for candidate in candidates:
        try:
            with candidate.as_directory() as directory:
                return read_checkpoint(Path(directory), device)
        except CheckpointCorruptError as error:
            problems.append(str(error))
            print(f"cxrtune: skipping an unreadable checkpoint: {error}", file=sys.stderr)
    raise CheckpointCorruptError(
        f"no readable checkpoint among {len(candidates)} in {parent}: " + "; ".join(problems)
    )


def _checkpoint_dirs(filesystem: Any, parent: str) -> list[tuple[int, str]]:
    """``(index, name)`` of every ``checkpoint_<index>`` folder in ``parent``."""
    import pyarrow.fs

    found = []
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(parent)):
        match = CHECKPOINT_DIR_PATTERN.match(info.base_name)
        if match and info.type == pyarrow.fs.FileType.Directory:
            found.append((int(match.group(1)), info.base_name))
    return found


def model_from_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TrialConfig, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint, in eval mode, with its config and raw state.

    Pretrained weights are not reloaded from their original file (which may not
    exist on this machine): the checkpoint holds every weight.
    """
    state = read_checkpoint(path, device)
    config = TrialConfig.from_dict(state["trial_config"])
    model = create_model(
        dataclasses.replace(config, weights="none"), len(state["class_names"]), state["image_size"]
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state
