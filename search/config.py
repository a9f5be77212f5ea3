"""The sweep file: YAML in, a validated ``SweepConfig`` out.

Every key has a default (documented in docs/sweep-file.md); unknown keys and wrong
types are errors naming the key, so a typo never silently falls back to a
default. ``--set key=value`` overrides use the same validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cxrtune.analysis.experiment import DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_SCHEDULER_METRIC
from cxrtune.analysis.storage import has_credentials, redacted
from cxrtune.spaces import FAMILIES, get_space
from cxrtune.trainables.config import (
    DEFAULT_MAX_EPOCHS,
    GROUPINGS,
    OPTIMIZERS,
    FamilyResources,
)
from cxrtune.trainables.layouts import LAYOUTS
from cxrtune.trainables.metrics import DEFAULT_TARGET_SPECIFICITY

__all__ = [
    "SAMPLERS",
    "SEARCHABLE_METRICS",
    "STOPPED_TRIAL_POLICIES",
    "SplitFractions",
    "SweepConfig",
    "SweepConfigError",
    "SyntheticData",
    "load_sweep_config",
    "write_sweep_config",
]

SAMPLERS = ("tpe", "nsga2")
# How a trial ASHA stopped early is told to Optuna (cxrtune.search.searcher).
STOPPED_TRIAL_POLICIES = ("complete", "pruned", "omit")
# Metrics a sweep may optimise or schedule on; they are what every trial reports.
SEARCHABLE_METRICS = (
    "val_covid_recall_at_spec",
    "val_covid_recall",
    "val_macro_auc",
    "val_accuracy",
    "val_covid_precision",
    "val_loss",
)


class SweepConfigError(ValueError):
    """The sweep file is invalid; the message names the key."""


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each class held out; the rest trains."""

    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class SyntheticData:
    """The embedded synthetic dataset used when the sweep names no ``data``."""

    n: int = 1200  # images
    size: int = 128  # pixels per side, as written to disk
    seed: int = 0


def _default_resources() -> dict[str, FamilyResources]:
    return {family: FamilyResources() for family in FAMILIES}


@dataclass(frozen=True)
class SweepConfig:
    """One sweep, as the sweep file describes it."""

    name: str = "sweep"  # experiment folder name prefix
    data: str | None = None  # dataset folder or CSV manifest; None = embedded synthetic set
    layout: str = "auto"  # dataset layout: "auto" or a registered layout name
    group_by: str = "patient"  # keep a "patient" or "source" in one split ("none": images alone)
    skip_bad_images: bool = (
        False  # skip unreadable images (listed in the report) instead of stopping
    )
    # drop an image found under two labels or in two splits of a manifest, not stop
    drop_conflicting_duplicates: bool = False
    manifest_encoding: str | None = None  # a CSV manifest's text encoding; None = UTF-8
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    image_size: int = 64  # pixels per side the models see
    positive_class: str = "COVID"  # the class whose recall is ranked
    splits: SplitFractions = field(default_factory=SplitFractions)
    test_source: str | None = None  # hold out this source as the test split (external site)
    # the operating point: threshold chosen on val for this
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY
    bootstrap_resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES  # for the 95% intervals of test metrics
    # trials evaluated on test, best val rank first; None = all up to 100, else the top 100
    evaluate_top: int | None = None
    seed: int = 0  # splits, sampler and model initialisation
    space: str = "default"  # a registered search space
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    num_samples: int = 24  # trials
    max_epochs: int = DEFAULT_MAX_EPOCHS
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    scheduler_metric: str = DEFAULT_SCHEDULER_METRIC
    objectives: list[str] = field(
        default_factory=lambda: ["val_covid_recall_at_spec", "val_macro_auc"]
    )
    sampler: str = "tpe"  # "tpe" or "nsga2" (nsga2 needs two objectives)
    # TPE's settings and how stopped trials are told: measured against one-change
    # variants by the search-efficiency benchmark, none of which beat them
    # (benchmarks/README.md).
    tpe_multivariate: bool = True  # model the parameters jointly, not one by one
    tpe_group: bool = True  # separate models per family's parameter set (needs multivariate)
    tpe_constant_liar: bool = True  # count running trials as bad, so parallel asks spread out
    tpe_startup_trials: int = 5  # random trials before TPE models anything
    # TPE models only the latest this many trials (0 = all): its ask grows with the
    # study, about 0.1 s at 1,000 trials and 0.5 s at 10,000 on one core.
    tpe_window_trials: int = 0
    stopped_trials: str = "complete"  # how ASHA-stopped trials are told: complete, pruned, omit
    try_each_family_first: bool = True  # the first trials cover every family once
    max_concurrent_trials: int = 0  # 0 = as many as the resources allow
    resources: dict[str, FamilyResources] = field(default_factory=_default_resources)
    weights: str = "none"  # vgg16: "imagenet", "none" or the path of a state dict
    optimizer: str = "adam"  # "adam" (coupled L2) or "adamw"
    storage_path: str = "results"  # local folder, NFS mount or s3://bucket/prefix
    max_failures: int = 1  # retries of a failed trial, from its last checkpoint
    checkpoints_to_keep: int = 2  # per trial, best by scheduler_metric (the latest is kept too)
    mlflow_uri: str | None = None  # MLflow tracking URI: one run per trial; None = no MLflow

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise SweepConfigError(f"families: must be a non-empty subset of {list(FAMILIES)}")
        if len(set(self.families)) != len(self.families):
            raise SweepConfigError(f"families: lists a family twice: {self.families}")
        missing = sorted(set(FAMILIES) - set(self.resources))
        extra = sorted(set(self.resources) - set(FAMILIES))
        if extra:
            raise SweepConfigError(f"resources: unknown families {extra}; known: {list(FAMILIES)}")
        if missing:
            # A partial `resources:` block keeps the defaults for the families it leaves out.
            merged = {**_default_resources(), **self.resources}
            object.__setattr__(self, "resources", merged)
        for family, resources in self.resources.items():
            if problem := resources.problem():
                raise SweepConfigError(f"resources.{family}: {problem}")
        for metric in [self.scheduler_metric, *self.objectives]:
            if metric not in SEARCHABLE_METRICS:
                raise SweepConfigError(
                    f"unknown metric {metric!r}; choose from {list(SEARCHABLE_METRICS)}"
                )
        if not 1 <= len(self.objectives) <= 2 or len(set(self.objectives)) != len(self.objectives):
            raise SweepConfigError("objectives: give one metric, or two different ones")
        if self.sampler not in SAMPLERS:
            raise SweepConfigError(
                f"sampler: must be one of {list(SAMPLERS)}, got {self.sampler!r}"
            )
        if self.sampler == "nsga2" and len(self.objectives) < 2:
            raise SweepConfigError("sampler: nsga2 needs two objectives")
        if self.tpe_group and not self.tpe_multivariate:
            raise SweepConfigError("tpe_group: needs tpe_multivariate")
        if self.tpe_startup_trials < 0:
            raise SweepConfigError("tpe_startup_trials: must be 0 or more")
        if self.tpe_window_trials < 0:
            raise SweepConfigError("tpe_window_trials: must be 0 (every trial) or more")
        if 0 < self.tpe_window_trials <= self.tpe_startup_trials:
            raise SweepConfigError(
                "tpe_window_trials: must exceed tpe_startup_trials, or TPE never models"
            )
        if self.stopped_trials not in STOPPED_TRIAL_POLICIES:
            raise SweepConfigError(
                f"stopped_trials: must be one of {list(STOPPED_TRIAL_POLICIES)}, "
                f"got {self.stopped_trials!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise SweepConfigError(
                f"optimizer: must be {' or '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        positive = {
            "image_size": self.image_size,
            "num_samples": self.num_samples,
            "max_epochs": self.max_epochs,
            "grace_period": self.grace_period,
            "checkpoints_to_keep": self.checkpoints_to_keep,
            "synthetic.n": self.synthetic.n,
            "synthetic.size": self.synthetic.size,
        }
        for key, value in positive.items():
            if value < 1:
                raise SweepConfigError(f"{key}: must be at least 1, got {value}")
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise SweepConfigError(
                f"layout: unknown dataset layout {self.layout!r}; known: auto, {', '.join(LAYOUTS)}"
            )
        if self.group_by not in GROUPINGS:
            raise SweepConfigError(
                f"group_by: must be one of {list(GROUPINGS)}, got {self.group_by!r}"
            )
        if not 0.0 < self.target_specificity < 1.0:
            raise SweepConfigError("target_specificity: must be in (0, 1)")
        if self.bootstrap_resamples < 1000:
            raise SweepConfigError("bootstrap_resamples: must be at least 1000")
        if self.evaluate_top is not None and self.evaluate_top < 1:
            raise SweepConfigError(
                f"evaluate_top: must be a positive integer (or null), got {self.evaluate_top}"
            )
        if has_credentials(self.storage_path):
            # Written into sweep.yaml, uploaded with it, and handed to every Ray node.
            raise SweepConfigError(
                f"storage_path: {redacted(self.storage_path)} carries credentials in the URI; "
                "remove them and give them through the AWS credential chain instead "
                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an "
                "instance role)"
            )
        if self.max_failures < 0:
            raise SweepConfigError(f"max_failures: must be 0 or more, got {self.max_failures}")
        try:
            get_space(self.space)
        except ValueError as error:
            raise SweepConfigError(f"space: {error}") from None
        if self.image_size % 8:
            raise SweepConfigError(f"image_size: must be a multiple of 8, got {self.image_size}")
        if self.grace_period > self.max_epochs:
            raise SweepConfigError("grace_period: must not exceed max_epochs")
        if self.reduction_factor < 2:
            raise SweepConfigError("reduction_factor: must be at least 2")
        if self.max_concurrent_trials < 0:
            raise SweepConfigError("max_concurrent_trials: must be 0 (no limit) or more")
        val, test = self.splits.val, self.splits.test
        if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
            raise SweepConfigError("splits: val and test must be in (0, 1) and sum below 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins, as written to ``sweep.yaml`` in the experiment dir."""
        return dataclasses.asdict(self)


def load_sweep_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> SweepConfig:
    """Read a sweep file (``None`` = all defaults), apply ``key=value`` overrides, then settings.

    Override keys may be dotted (``resources.vgg16.gpus=1``); values are parsed
    as YAML (``families=[vgg16]``, ``data=null``). ``settings`` maps dotted keys
    to values taken as they are, never parsed: a command-line option such as
    ``--data "/scans/ward #2"`` means that exact string.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as error:
            raise SweepConfigError(f"cannot read sweep file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise SweepConfigError(f"{path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise SweepConfigError(
                f"{path} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        values = loaded or {}
    for override in overrides or []:
        key, separator, raw = override.partition("=")
        if not separator or not key:
            raise SweepConfigError(f"--set expects key=value, got {override!r}")
        _set_dotted(values, key.strip(), yaml.safe_load(raw))
    for key, value in (settings or {}).items():
        _set_dotted(values, key, value)
    return from_mapping(SweepConfig, values)


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target = values
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise SweepConfigError(f"--set {dotted}: {part!r} is not a mapping")
        target = child
    target[last] = value


T = typing.TypeVar("T")


def from_mapping(cls: type[T], values: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(values, dict):
        raise SweepConfigError(f"{where or 'sweep file'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise SweepConfigError(
            f"unknown key(s) {[prefix + key for key in unknown]}; known keys: {sorted(known)}"
        )
    converted = {
        key: _convert(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in values.items()
    }
    try:
        return cls(**converted)
    except SweepConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise SweepConfigError(f"{where or 'sweep file'}: {error}") from error


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, key)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise SweepConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, arguments[0], f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SweepConfigError(f"{key}: expected a mapping, got {value!r}")
        return {
            _convert(name, arguments[0], key): _convert(item, arguments[1], f"{key}.{name}")
            for name, item in value.items()
        }
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"sweep config type {annotation!r} of {key} is not supported")
    raise SweepConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")


def write_sweep_config(config: SweepConfig, path: Path) -> None:
    """Write the resolved config as YAML (every key, defaults included).

    Keys written into a URI (``http://user:password@host``) are written as ``***``.
    """
    values = config.to_dict()
    for key in ("storage_path", "mlflow_uri"):
        if values[key] is not None:
            values[key] = redacted(values[key])
    path.write_text(yaml.safe_dump(values, sort_keys=False))
