"""The built-in spaces: ``default`` for real sweeps, ``quick`` for a laptop CPU.

Both follow the original study's three families. ``baseline_cnn`` is the
control: it never gets dropout, L2 or augmentation, so whatever the other
families gain over it is what regularisation and transfer learning buy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrtune.spaces._registry import FAMILIES, IMBALANCE_STRATEGIES, register_space


@dataclass(frozen=True)
class Ranges:
    """The ranges one space searches; ``(low, high)`` pairs are inclusive."""

    lr: tuple[float, float]
    batch_sizes: tuple[int, ...]
    dropout: tuple[float, float]
    weight_decay: tuple[float, float]
    augment_strength: tuple[float, float]
    finetune_blocks: tuple[int, int]
    vgg16_lr: tuple[float, float]


DEFAULT_RANGES = Ranges(
    lr=(1e-4, 3e-3),
    batch_sizes=(16, 32, 64),
    dropout=(0.0, 0.6),
    weight_decay=(1e-6, 1e-2),
    augment_strength=(0.0, 1.0),
    finetune_blocks=(0, 5),
    vgg16_lr=(1e-5, 1e-3),
)

# Narrower ranges that train well in a few CPU epochs; VGG16 fine-tunes at most
# its last two blocks because deeper fine-tuning is too slow without a GPU.
QUICK_RANGES = Ranges(
    lr=(5e-4, 3e-3),
    batch_sizes=(32, 64),
    dropout=(0.0, 0.5),
    weight_decay=(1e-6, 1e-3),
    augment_strength=(0.0, 0.6),
    finetune_blocks=(0, 2),
    vgg16_lr=(1e-4, 1e-3),
)


def sample_family_config(trial: Any, families: Sequence[str], ranges: Ranges) -> dict[str, Any]:
    """Sample ``family`` then its parameters into ``trial``; return the values held fixed.

    Parameter names are shared across families (``lr``, ``dropout``, ...) so that
    the leaderboard has one column per hyperparameter.
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {list(FAMILIES)}, got {families}")
    family = trial.suggest_categorical("family", list(families))
    trial.suggest_categorical("batch_size", list(ranges.batch_sizes))
    trial.suggest_categorical("imbalance", list(IMBALANCE_STRATEGIES))
    if family == "baseline_cnn":
        trial.suggest_float("lr", *ranges.lr, log=True)
        return {"dropout": 0.0, "weight_decay": 0.0, "augment_strength": 0.0, "finetune_blocks": 0}

    trial.suggest_float("dropout", *ranges.dropout)
    trial.suggest_float("weight_decay", *ranges.weight_decay, log=True)
    trial.suggest_float("augment_strength", *ranges.augment_strength)
    if family == "regularized_cnn":
        trial.suggest_float("lr", *ranges.lr, log=True)
        return {"finetune_blocks": 0}

    # A backbone fine-tuned from pretrained weights wants a smaller step size.
    trial.suggest_float("lr", *ranges.vgg16_lr, log=True)
    trial.suggest_int("finetune_blocks", *ranges.finetune_blocks)
    return {}


@register_space("default")
def default_space(trial: Any, families: Sequence[str]) -> dict[str, Any]:
    """Wide ranges for a GPU sweep of hundreds of trials."""
    return sample_family_config(trial, families, DEFAULT_RANGES)


@register_space("quick")
def quick_space(trial: Any, families: Sequence[str]) -> dict[str, Any]:
    """Narrow ranges for a few-minute sweep on a laptop CPU."""
    return sample_family_config(trial, families, QUICK_RANGES)
