"""The searcher's ask and tell latency as its study grows, driven as Tune drives it.

``measure_searcher_latency`` builds the sweep's real searcher (``build_searcher``,
the study in an Optuna journal file) and plays a cluster's sweep against it without
Ray: ``in_flight`` trials outstanding at once (so the constant liar sees running
trials), each asked for with ``suggest``, reporting one ``on_trial_result`` per
epoch and ended by ``on_trial_complete``. Trials finish in the order a cluster would
finish them: each takes its epochs times its family's epoch cost, and ASHA-like
stops end half the trials at each rung. Each ``suggest`` (ask) and each
``on_trial_complete`` (tell) is timed with ``time.perf_counter``.

The reported values come from ``synthetic_curve``, a cheap deterministic function
of the config, unless the caller passes another (the search benchmark's surrogate,
``benchmarks.search_efficiency.replay_curve``): the searcher's cost depends on how
many trials the study holds, not on how good they are.
"""

from __future__ import annotations

import heapq
import json
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrtune.search.config import SweepConfig, load_sweep_config

__all__ = [
    "LatencyAtSize",
    "SearcherLatency",
    "TrialLatency",
    "measure_searcher_latency",
    "synthetic_curve",
]

# The study sizes the cluster-scale issue asks about, and how many trials end at each.
SIZES = (100, 1_000, 5_000, 10_000)
TRIALS_PER_SIZE = 100
# Trials outstanding at once: a cluster of a few GPU nodes running small-CNN trials.
IN_FLIGHT = 16
# Relative cost of one epoch per family, for the order in which trials finish only.
EPOCH_COST = {"baseline_cnn": 0.5, "regularized_cnn": 0.6, "vgg16": 1.9}

Curve = Callable[[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class TrialLatency:
    """One trial's calls: the study's size when it was asked for, and the seconds each took."""

    study_size: int  # trials in the study before this one's ask
    ask_s: float  # suggest
    tell_s: float  # on_trial_complete
    epochs: int  # on_trial_result calls before the tell


@dataclass(frozen=True)
class LatencyAtSize:
    """Percentiles of the trials asked for just before the study reached ``study_size``."""

    study_size: int
    trials: int  # trials in the bucket
    ask_p50_s: float
    ask_p95_s: float
    tell_p50_s: float
    tell_p95_s: float
    ask_tell_p50_s: float  # of each trial's ask + tell
    ask_tell_p95_s: float


@dataclass(frozen=True)
class SearcherLatency:
    """What ``measure_searcher_latency`` measured: percentiles per size and every trial."""

    sizes: list[LatencyAtSize]
    trials: list[TrialLatency]  # in the order they were asked for
    wall_s: float  # the whole run, curves included
    config: dict[str, Any]  # the resolved sweep config the searcher was built from

    def series(self) -> list[tuple[int, float, float]]:
        """``(study size, ask seconds, tell seconds)`` per trial, for a plot."""
        return [(t.study_size, t.ask_s, t.tell_s) for t in self.trials]

    def to_json(self) -> dict[str, Any]:
        return {
            "sizes": [vars(size) for size in self.sizes],
            "series": self.series(),
            "wall_s": self.wall_s,
            "config": self.config,
        }


def synthetic_curve(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every epoch's validation metrics of a trial of ``config``, cut where ASHA might stop it.

    Deterministic in the config. Quality peaks at a learning rate of 1e-3 and grows
    with the epoch; half the trials stop at each rung (epochs 2, 4, 8, ...), as ASHA
    with reduction factor 2 and grace period 2 would stop them.
    """
    key = zlib.crc32(json.dumps(config, sort_keys=True, default=str).encode())
    rng = np.random.default_rng(key)
    max_epochs = int(config["max_epochs"])
    epochs = max_epochs
    rung = 2
    while rung < max_epochs:
        if rng.random() < 0.5:
            epochs = rung
            break
        rung *= 2
    lr_fit = math.exp(-((math.log10(float(config["lr"])) + 3.0) ** 2))
    quality = 0.5 + 0.4 * lr_fit * (1.0 - 0.3 * float(config.get("dropout", 0.0)))
    offset = rng.normal(0.0, 0.03)
    curve = []
    for epoch in range(1, epochs + 1):
        level = quality * (1.0 - 0.5 * math.exp(-epoch / 2.0)) + offset
        value = min(1.0, max(0.0, level + rng.normal(0.0, 0.01)))
        curve.append(
            {
                "epoch": epoch,
                "training_iteration": epoch,
                "val_macro_auc": value,
                "val_covid_recall_at_spec": min(1.0, max(0.0, value**2 + rng.normal(0.0, 0.02))),
                "val_covid_recall": value,
                "val_accuracy": value,
                "val_covid_precision": value,
                "val_loss": 1.0 - value,
            }
        )
    return curve


def latency_at_size(trials: Sequence[TrialLatency], study_size: int) -> LatencyAtSize:
    """Percentiles over the trials asked for when the study held fewer than ``study_size``,
    the last ``TRIALS_PER_SIZE`` of them."""
    bucket = [t for t in trials if study_size - TRIALS_PER_SIZE <= t.study_size < study_size]
    if not bucket:
        raise ValueError(f"no trial was asked for below a study size of {study_size}")
    ask = np.array([t.ask_s for t in bucket])
    tell = np.array([t.tell_s for t in bucket])
    both = ask + tell
    return LatencyAtSize(
        study_size=study_size,
        trials=len(bucket),
        ask_p50_s=float(np.percentile(ask, 50)),
        ask_p95_s=float(np.percentile(ask, 95)),
        tell_p50_s=float(np.percentile(tell, 50)),
        tell_p95_s=float(np.percentile(tell, 95)),
        ask_tell_p50_s=float(np.percentile(both, 50)),
        ask_tell_p95_s=float(np.percentile(both, 95)),
    )


def measure_searcher_latency(
    sizes: Sequence[int] = SIZES,
    *,
    sweep_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    in_flight: int = IN_FLIGHT,
    curve: Curve = synthetic_curve,
    journal: Path | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> SearcherLatency:
    """Ask and tell latency of the sweep's searcher, at each of ``sizes`` trials in its study.

    The searcher is built from ``sweep_file`` (``None``: the sweep defaults) with
    ``overrides`` (``--set`` style, ``"tpe_group=false"``), in the Optuna journal
    file ``journal`` (a temporary one when ``None``). The run asks for
    ``max(sizes)`` trials and tells every one of them; a size's percentiles are
    over the ``TRIALS_PER_SIZE`` trials asked for just before it (fewer when the
    size is smaller). ``progress`` is called with the trials told so far and the
    seconds elapsed, every 100 trials. Starts no Ray.
    """
    if not sizes or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"sizes must be increasing positive study sizes, got {list(sizes)}")
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    config = load_sweep_config(sweep_file, list(overrides))
    if journal is None:
        with tempfile.TemporaryDirectory(prefix="searcher-latency-") as folder:
            return _measure(config, sizes, in_flight, curve, Path(folder) / "journal.log", progress)
    return _measure(config, sizes, in_flight, curve, journal, progress)


def _measure(
    config: SweepConfig,
    sizes: Sequence[int],
    in_flight: int,
    curve: Curve,
    journal: Path,
    progress: Callable[[int, float], None] | None,
) -> SearcherLatency:
    from cxrtune.search.tuner import build_searcher

    started = time.perf_counter()
    searcher = build_searcher(config, "none", journal)
    total = max(sizes)
    # (finish time, ask order, trial id, results to report, ask seconds, size at ask)
    running: list[tuple[float, int, str, list[dict[str, Any]], float, int]] = []
    measured: list[TrialLatency | None] = [None] * total
    clock, asked, told = 0.0, 0, 0
    while told < total:
        while asked < total and len(running) < in_flight:
            trial_id = f"{asked:05d}"
            ask_started = time.perf_counter()
            trial_config = searcher.suggest(trial_id)
            ask_s = time.perf_counter() - ask_started
            if trial_config is None:
                raise RuntimeError(f"the searcher gave no config for trial {trial_id}")
            results = curve(trial_config)
            cost = EPOCH_COST.get(str(trial_config["family"]), 1.0) * len(results)
            heapq.heappush(running, (clock + cost, asked, trial_id, results, ask_s, asked))
            asked += 1
        clock, order, trial_id, results, ask_s, study_size = heapq.heappop(running)
        # Tune hands the last result to on_trial_complete only.
        for result in results[:-1]:
            searcher.on_trial_result(trial_id, result)
        tell_started = time.perf_counter()
        searcher.on_trial_complete(trial_id, results[-1])
        tell_s = time.perf_counter() - tell_started
        measured[order] = TrialLatency(study_size, ask_s, tell_s, len(results))
        told += 1
        if progress is not None and told % 100 == 0:
            progress(told, time.perf_counter() - started)
    trials = [t for t in measured if t is not None]
    return SearcherLatency(
        sizes=[latency_at_size(trials, size) for size in sizes],
        trials=trials,
        wall_s=time.perf_counter() - started,
        config=config.to_dict(),
    )
