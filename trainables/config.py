"""``TrialConfig``: the typed form of one trial's config dict.

Ray hands a trial a plain dict (the sampled hyperparameters plus the values the
sweep holds fixed). It becomes a ``TrialConfig`` at once, so a missing key, an
unknown key or a wrong type fails before any training, with the key named.
The resolved config is stored inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cxrtune.spaces import FAMILIES, IMBALANCE_STRATEGIES

__all__ = [
    "DEFAULT_MAX_EPOCHS",
    "GROUPINGS",
    "OPTIMIZERS",
    "VGG16_BLOCKS",
    "ConfigError",
    "FamilyResources",
    "TrialConfig",
]

OPTIMIZERS = ("adam", "adamw")
# What the splits keep together: each patient, each source, or nothing (images alone).
GROUPINGS = ("patient", "source", "none")
DEFAULT_MAX_EPOCHS = 10
VGG16_BLOCKS = 5


class ConfigError(ValueError):
    """A config is malformed; the message names the key and what is wrong."""


@dataclass(frozen=True)
class FamilyResources:
    """What one trial of a family reserves: ``workers`` processes, each ``cpus`` and ``gpus``."""

    cpus: float = 1.0  # CPU cores per worker; torch uses this many threads
    gpus: float = 0.0  # per worker, at most 1; fractions share a GPU (0.25: four trials on one)
    workers: int = 1  # more than 1: the trial trains data-parallel on this many workers

    def problem(self) -> str | None:
        """What is wrong with these resources, or ``None``."""
        if self.cpus <= 0 or self.gpus < 0:
            return "cpus must be > 0 and gpus >= 0"
        if self.workers < 1:
            return f"workers must be at least 1, got {self.workers}"
        if self.gpus > 1:
            # One worker process trains on one device; more GPUs mean more workers.
            return (
                f"gpus is per worker and at most 1, got {self.gpus:g}; to train a trial "
                f"on {self.gpus:g} GPUs, set workers: {math.ceil(self.gpus)} and gpus: 1"
            )
        if self.workers > 1 and 0 < self.gpus < 1:
            # NCCL cannot run two ranks of one job on the same GPU.
            return "data-parallel workers (workers > 1) need a whole GPU each: gpus 0 or 1"
        return None


@dataclass(frozen=True)
class TrialConfig:
    """Everything that decides how one trial trains."""

    family: str
    lr: float  # Adam step size
    batch_size: int  # images per optimisation step
    imbalance: str  # "none" | "oversample" | "class_weight"
    dropout: float = 0.0  # dropout probability before the classifier
    weight_decay: float = 0.0  # L2 penalty (coupled for adam, decoupled for adamw)
    augment_strength: float = 0.0  # 0 = no augmentation, 1 = the strongest
    finetune_blocks: int = 0  # vgg16: how many of the last conv blocks train (0 = head only)
    weights: str = "none"  # vgg16: "none" or where the driver read the pretrained state dict
    optimizer: str = "adam"
    max_epochs: int = DEFAULT_MAX_EPOCHS
    seed: int = 0

    def __post_init__(self) -> None:
        _require_choice("family", self.family, FAMILIES)
        _require_choice("imbalance", self.imbalance, IMBALANCE_STRATEGIES)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_range("lr", self.lr, 0.0, 1.0, low_open=True)
        _require_range("batch_size", self.batch_size, 1, 65536)
        _require_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _require_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _require_range("augment_strength", self.augment_strength, 0.0, 1.0)
        _require_range("finetune_blocks", self.finetune_blocks, 0, VGG16_BLOCKS)
        _require_range("max_epochs", self.max_epochs, 1, 100_000)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a trial's config dict; unknown keys and wrong types raise ``ConfigError``."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown trial config key(s) {unknown}; known keys: {sorted(fields)}"
            )
        missing = sorted(
            name
            for name, field in fields.items()
            if name not in values and field.default is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"trial config is missing required key(s) {missing}")
        coerced = {name: _coerce(name, value, fields[name].type) for name, value in values.items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of builtins, safe for ``torch.load(weights_only=True)`` and JSON."""
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    # Optuna and YAML hand over numpy scalars and ints where floats are meant.
    kind = {"str": str, "int": int, "float": float}[str(annotation)]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and hasattr(value, "__index__") and not isinstance(value, bool):
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"trial config key {name!r} must be {kind.__name__}, got {value!r}")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _require_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
