"""What every benchmark shares: the registry, goals, interleaved repeats, a private Ray.

A benchmark is a function of ``Settings`` that returns a ``BenchmarkResult``:
rows, each one figure (a ratio against a baseline measured in the same run, or
seconds where nothing can be compared) checked against a goal.
"""

from __future__ import annotations

import operator
import os
import statistics
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cxrtune.search.ray_environment import use_loopback_ray

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class Settings:
    """How big a run is and where it may write."""

    quick: bool  # smoke-test sizes, one repeat per side: the suite in about two minutes
    repeats: int  # runs of each side, interleaved; the figure uses their medians
    workdir: Path  # scratch space, removed when the suite ends
    cores: int
    trials: int | None = None  # for benchmarks that run a number of trials: that number


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Goal:
    """``figure <operator> threshold``, e.g. ``>= 3``."""

    operator: str
    threshold: float

    def __post_init__(self) -> None:
        if self.operator not in _OPERATORS:
            raise ValueError(f"unknown goal operator {self.operator!r}; known: {list(_OPERATORS)}")

    def met(self, figure: float) -> bool:
        return _OPERATORS[self.operator](figure, self.threshold)

    def __str__(self) -> str:
        return f"{self.operator} {self.threshold:g}"


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what ran, in which unit, and every repeat."""

    label: str
    unit: str
    repeats: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.repeats))

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "repeats": self.repeats,
            "median": self.median,
        }


@dataclass
class Row:
    """One figure checked against its goal."""

    case: str
    figure: float
    figure_kind: str  # what the figure is: "ratio (candidate / baseline)", "seconds", ...
    goal: Goal | None  # None: reported, not judged
    candidate: Side
    baseline: Side | None = None
    notes: str = ""
    censored: bool = False  # the figure is a bound: the true value lies beyond it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.figure)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "figure": self.figure,
            "figure_kind": self.figure_kind,
            "censored": self.censored,
            "goal": None if self.goal is None else str(self.goal),
            "met": self.met,
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "candidate": self.candidate.to_json(),
            "notes": self.notes,
            **self.extra,
        }


def ratio_row(
    case: str, baseline: Side, candidate: Side, goal: Goal | None, notes: str = "", **extra: Any
) -> Row:
    """A row whose figure is ``median(candidate) / median(baseline)``."""
    paired = [c / b for b, c in zip(baseline.repeats, candidate.repeats, strict=True)]
    return Row(
        case=case,
        figure=candidate.median / baseline.median,
        figure_kind="ratio (candidate / baseline medians)",
        goal=goal,
        candidate=candidate,
        baseline=baseline,
        notes=notes,
        extra={"paired_ratios": paired, **extra},
    )


@dataclass
class BenchmarkResult:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why the benchmark did not run, e.g. "no GPU"


Benchmark = Callable[[Settings], BenchmarkResult]


@dataclass(frozen=True)
class Registered:
    name: str
    summary: str  # one line: what is compared with what
    run: Benchmark


BENCHMARKS: dict[str, Registered] = {}


def register_benchmark(name: str, summary: str) -> Callable[[Benchmark], Benchmark]:
    """Register a benchmark under ``name``; a second use of a name is an error."""

    def decorate(run: Benchmark) -> Benchmark:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is already registered")
        BENCHMARKS[name] = Registered(name, summary, run)
        return run

    return decorate


def get_benchmark(name: str) -> Registered:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def interleave(
    baseline: Callable[[], A], candidate: Callable[[], B], repeats: int
) -> tuple[list[A], list[B]]:
    """Run both sides ``repeats`` times, alternating which goes first (AB, BA, AB, ...).

    Slow drift of the machine (other work, thermal state) then hits both sides,
    and neither always runs on the other's warm caches.
    """
    baseline_runs: list[A] = []
    candidate_runs: list[B] = []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            baseline_runs.append(baseline())
            candidate_runs.append(candidate())
        else:
            candidate_runs.append(candidate())
            baseline_runs.append(baseline())
    return baseline_runs, candidate_runs


def import_psutil() -> Any:
    """psutil ships inside Ray (``ray/thirdparty_files``); it imports once Ray has."""
    import ray  # noqa: F401

    # isort: split
    import psutil

    return psutil


@contextmanager
def private_ray(resources: Mapping[str, float] | None = None) -> Iterator[None]:
    """A local Ray instance on 127.0.0.1, as a sweep starts it; shut down on exit.

    ``resources``: custom resources it offers besides the machine's cores.
    """
    use_loopback_ray()
    from cxrtune.search.sweep import start_ray

    start_ray(None, resources=resources)
    import ray

    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def scoped_environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
