"""search_efficiency: search variants replayed over recorded learning curves.

Training is replaced by a surrogate of curves recorded once
(``benchmarks/data/curves.csv.gz``, ``record_curves``; ``_surrogate``): each
trial reports the surrogate's validation metrics epoch by epoch, with noise at
the measured seed spread, through the real ``Tuner``: real Ray, real ASHA, the
project's searcher and trial space. Nothing sleeps; the cost of a trial-epoch is
its family's measured epoch time, relative to the families' mean.

Variants, each on the same seeds (paired): ``cxrtune`` (the sweep defaults:
``build_searcher`` and ``build_scheduler``), ``random`` (Optuna's
``RandomSampler``, no scheduler), ``random_asha`` and ``tpe`` (the searcher
without ASHA). At each budget (in trial-epochs), per variant:

- the share of the budget at which it first reaches random search's best primary
  objective (``val_covid_recall_at_spec``) at that budget; 1, censored, when it
  never does (median and IQR over seeds);
- the 2-D hypervolume of (val recall at spec, val macro AUC) of its trials, each
  at its best-validation epoch, reference point (0, 0);
- how often its hypervolume beats random's.

Searches run ``REPLAY_DRIVERS`` at a time (default 4), each from its own driver
process attached to one Ray instance, with one actor serving every trial's curve.

``REPLAY_SEEDS`` in the environment sets the number of seeds (default 20);
``REPLAY_VARIANTS`` (comma-separated, ``random`` among them) the variants, among
them one-change variants of the sweep defaults (``VARIANTS``).
A PNG of the anytime curves (median running best primary objective over seeds)
goes to ``benchmarks/results/search_efficiency_anytime.png``, or
``search_efficiency_anytime-variants.png`` for another selection of variants (not
for ``--quick``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import (
    BenchmarkResult,
    Goal,
    Row,
    Settings,
    Side,
    private_ray,
    register_benchmark,
    scoped_environment,
)
from benchmarks._surrogate import TARGETS, Surrogate, fit_surrogate, held_out_fit, read_table
from benchmarks.record_curves import MAX_EPOCHS
from cxrtune.search.config import SweepConfig, load_sweep_config
from cxrtune.search.ray_environment import use_loopback_ray

BUDGETS = (50, 100, 200)
SEEDS = 20
# name -> (sampler, ASHA or not, sweep-file overrides). The first four are the
# comparison; the others change one sweep default each, to choose the defaults by
# measurement (``REPLAY_VARIANTS=cxrtune,random,pruned,... `` runs a selection).
VARIANTS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "cxrtune": ("tpe", True, ()),
    "random": ("random", False, ()),
    "random_asha": ("random", True, ()),
    "tpe": ("tpe", False, ()),
    "pruned": ("tpe", True, ("stopped_trials=pruned",)),
    "omit": ("tpe", True, ("stopped_trials=omit",)),
    "independent": ("tpe", True, ("tpe_multivariate=false", "tpe_group=false")),
    "no_group": ("tpe", True, ("tpe_group=false",)),
    "no_liar": ("tpe", True, ("tpe_constant_liar=false",)),
    "startup_10": ("tpe", True, ("tpe_startup_trials=10",)),
    "grace_1": ("tpe", True, ("grace_period=1",)),
    "reduction_3": ("tpe", True, ("reduction_factor=3",)),
    # A window far below the budget's 60-90 trials, so that it bites: TPE then models
    # only the latest 20 to 25 trials, as a cluster sweep's window would at 10,000.
    "window_20": ("tpe", True, ("tpe_window_trials=20",)),
}
COMPARED = ("cxrtune", "random", "random_asha", "tpe")
PRIMARY, SECONDARY = TARGETS
SHARE_GOAL = Goal("<=", 0.4)
BEATS_GOAL = Goal(">=", 0.8)
# Searches at once, each from its own driver process (``run_searches``), each with four
# trials at a time. A replayed trial only reports, so it takes no CPU but one of its
# driver's four slots (a custom resource): more logical CPUs would have Ray keep that
# many idle workers started. Starting a worker is most of what a search costs: each
# search starts exactly four (``StartLine``) and reuses them for all its trials.
REPLAY_DRIVERS = int(os.environ.get("REPLAY_DRIVERS", "4"))
REPLAY_CONCURRENCY = 4
CURVE_SERVER, START_LINE, REPLAY_NAMESPACE = "replay-curves", "replay-start", "cxrtune-replay"
PLOT = Path(__file__).resolve().parent / "results" / "search_efficiency_anytime.png"


def replay_config(seed: int, overrides: tuple[str, ...] = ()) -> SweepConfig:
    """The sweep every variant replays: the quick space, all families, sweep defaults."""
    return load_sweep_config(
        None,
        [
            "space=quick",
            f"max_epochs={MAX_EPOCHS}",
            f"seed={seed}",
            "num_samples=10000",  # the budget ends the search first
            *overrides,
        ],
    )


def replay_curve(config: dict[str, Any], surrogate: Surrogate) -> list[dict[str, Any]]:
    """The results a trial of ``config`` reports, one per epoch, as the surrogate draws them.

    The noise depends on the config (and so the sweep seed) only: variants that try
    the same config on the same seed see the same curve.
    """
    key = zlib.crc32(json.dumps(config, sort_keys=True, default=str).encode())
    curve = surrogate.curve(config, np.random.default_rng(key))
    cost = surrogate.epoch_cost.get(str(config["family"]), 1.0)
    return [
        {"epoch": int(epoch), **{t: float(curve[t][index]) for t in TARGETS}, "cost": cost}
        for index, epoch in enumerate(curve["epoch"])
    ]


class CurveServer:
    """Holds the surrogate in one Ray actor and answers every replayed trial's curve."""

    def __init__(self, surrogate: Surrogate) -> None:
        self.surrogate = surrogate

    def curve(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        return replay_curve(config, self.surrogate)


def replay_slot(driver: int) -> str:
    """The custom resource that bounds the trials of one driver's searches."""
    return f"replay_slots_{driver}"


def run_variant(
    variant: str, seed: int, curves: Any, budget: float, storage: Path, driver: int = 0
) -> list[dict[str, Any]]:
    """One search until ``budget`` cost; every reported epoch in arrival order."""
    import optuna
    import ray
    from ray import tune

    from benchmarks._replay import ReplayTrial
    from cxrtune.search.tuner import build_scheduler, build_searcher, trial_dirname

    # The trials keep no result files (below), so the result grid Tune builds at the
    # end finds none: a warning per trial that says nothing here. Nor does the line on
    # where the experiment state went, once per search.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    sampler, asha, overrides = VARIANTS[variant]
    config = replay_config(seed, overrides)
    searcher = build_searcher(config, "none")
    if sampler == "random":
        searcher.study.sampler = optuna.samplers.RandomSampler(seed=seed)
    scheduler = build_scheduler(config) if asha else None
    records: list[dict[str, Any]] = []

    class Timeline(tune.Callback):
        def __init__(self) -> None:
            self.seen: set[tuple[str, int]] = set()
            self.spent = 0.0

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            key = (trial.trial_id, int(result["epoch"]))
            if key in self.seen:
                return
            self.seen.add(key)
            self.spent += float(result["cost"])
            records.append(
                {
                    "trial": trial.trial_id,
                    "cost": self.spent,
                    **{target: float(result[target]) for target in TARGETS},
                }
            )

    timeline = Timeline()

    class Budget(tune.Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            return timeline.spent >= budget

    name = f"replay-{variant}-{uuid.uuid4().hex[:8]}"
    start = (ray.get_actor(START_LINE, namespace=REPLAY_NAMESPACE), name, REPLAY_CONCURRENCY)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(ReplayTrial, curves=curves, start=start),
            {"CPU": 0, replay_slot(driver): 1},
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=config.num_samples,
            # As many as fit, so that a trial the searcher adds finds a worker free:
            # the one its predecessor left, reused (``reuse_actors``).
            max_concurrent_trials=REPLAY_CONCURRENCY,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            stop=Budget(),
            callbacks=[timeline],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    # Tune's per-trial CSV, JSON and TensorBoard loggers: files nobody reads here.
    # Nothing resumes a replay: its experiment state need not be saved as it goes.
    with scoped_environment(
        TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", TUNE_GLOBAL_CHECKPOINT_S="86400"
    ):
        tuner.fit()
    return records


# This search process's driver number, from ``attach_driver``.
DRIVER = 0


def exit_with_parent(parent: int) -> None:
    """End this process once ``parent`` is gone, as when the benchmark is interrupted.

    A process pool's workers would otherwise keep running their searches, orphaned.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def attach_driver(address: str, numbers: Any) -> None:
    """Start a search process: join the benchmark's Ray instance as one more driver."""
    from cxrtune.search.sweep import start_ray

    exit_with_parent(os.getppid())
    global DRIVER
    DRIVER = numbers.get()
    use_loopback_ray()
    start_ray(address)


def search_in_driver(variant: str, seed: int, budget: float, storage: Path) -> list[dict]:
    """``run_variant`` in a search process, with the curve server found by name."""
    import ray

    curves = ray.get_actor(CURVE_SERVER, namespace=REPLAY_NAMESPACE)
    return run_variant(variant, seed, curves, budget, storage, DRIVER)


def run_searches(
    tasks: list[tuple[str, int]], budget: float, storage: Path
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every ``(variant, seed)`` search, ``REPLAY_DRIVERS`` at a time; their timelines.

    A search mostly waits on round trips to its trials' workers, so several run at
    once, each from its own driver process attached to the one Ray instance.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import ray

    address = ray.get_runtime_context().gcs_address
    context = multiprocessing.get_context("spawn")
    numbers = context.Queue()
    for driver in range(REPLAY_DRIVERS):
        numbers.put(driver)
    started = time.perf_counter()
    timelines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(
        REPLAY_DRIVERS,
        mp_context=context,
        initializer=attach_driver,
        initargs=(address, numbers),
    ) as pool:
        futures = {
            pool.submit(search_in_driver, variant, seed, budget, storage): (variant, seed)
            for variant, seed in tasks
        }
        for count, future in enumerate(as_completed(futures), start=1):
            variant, seed = futures[future]
            timelines[variant, seed] = records = future.result()
            best = max((record[PRIMARY] for record in records), default=float("nan"))
            print(
                f"[{time.perf_counter() - started:4.0f}s {count}/{len(tasks)}] seed {seed} "
                f"{variant:<12} {len(records)} epochs, best {PRIMARY} {best:.3f}",
                flush=True,
            )
    return timelines


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both maximised) above the reference point (0, 0)."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, reverse=True):
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def anytime(records: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """After each record: (cost, best primary objective, hypervolume) of the trials so far.

    Each trial counts at its best-validation epoch so far (best ``val_macro_auc``,
    earlier epochs winning ties), as the searcher tells it and the leaderboard ranks it.
    """
    best: dict[str, tuple[float, float]] = {}
    series = []
    for record in records:
        pair = (record[PRIMARY], record[SECONDARY])
        held = best.get(record["trial"])
        if held is None or pair[1] > held[1]:
            best[record["trial"]] = pair
        points = list(best.values())
        series.append((record["cost"], max(p[0] for p in points), hypervolume(points)))
    return series


def at_budget(series: list[tuple[float, float, float]], budget: float) -> tuple[float, float]:
    """Best primary objective and hypervolume once ``budget`` is spent (or all there is)."""
    within = [point for point in series if point[0] <= budget] or series[:1]
    return within[-1][1], within[-1][2]


def share_to_reach(
    series: list[tuple[float, float, float]], target: float, budget: float
) -> tuple[float, bool]:
    """Share of ``budget`` at which the best primary objective first reaches ``target``."""
    for cost, best, _ in series:
        if cost > budget:
            break
        if best >= target:
            return cost / budget, True
    return 1.0, False


def paired(candidate: list[float], defaults: list[float]) -> tuple[int, int, float]:
    """Seeds where ``candidate``'s hypervolume beats the defaults', where it loses, and the
    two-sided Wilcoxon signed-rank p-value of the pairs (1 when every pair ties)."""
    from scipy.stats import wilcoxon

    better = sum(c > d for c, d in zip(candidate, defaults, strict=True))
    worse = sum(c < d for c, d in zip(candidate, defaults, strict=True))
    if better + worse == 0:
        return 0, 0, 1.0
    return better, worse, float(wilcoxon(candidate, defaults, zero_method="zsplit").pvalue)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = np.percentile(values, [25, 50, 75])
    return float(low), float(median), float(high)


def plot_anytime(series: dict[str, list[list[tuple[float, float, float]]]], path: Path) -> None:
    """Median (and IQR band) over seeds of the running best primary objective, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(1, max(BUDGETS), 200)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for variant, runs in series.items():
        curves = []
        for run in runs:
            costs = np.array([point[0] for point in run])
            bests = np.array([point[1] for point in run])
            index = np.searchsorted(costs, grid, side="right") - 1
            curves.append(np.where(index >= 0, bests[np.clip(index, 0, None)], np.nan))
        stacked = np.array(curves)
        axes.plot(grid, np.nanmedian(stacked, axis=0), label=variant)
        axes.fill_between(
            grid,
            np.nanpercentile(stacked, 25, axis=0),
            np.nanpercentile(stacked, 75, axis=0),
            alpha=0.15,
        )
    axes.set_xlabel("budget spent (trial-epochs, weighted by family epoch time)")
    axes.set_ylabel(f"best {PRIMARY} so far")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"Replay: median over {len(next(iter(series.values())))} seeds (band: IQR)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


@register_benchmark(
    "search_efficiency",
    "replayed curves: share of budget to reach random's best recall at spec; hypervolume",
)
def search_efficiency(settings: Settings) -> BenchmarkResult:
    import ray

    from benchmarks._replay import StartLine

    table = read_table()
    fit = held_out_fit(table)
    surrogate = fit_surrogate(table)
    seeds = list(range(1 if settings.quick else int(os.environ.get("REPLAY_SEEDS", SEEDS))))
    budgets = (20,) if settings.quick else BUDGETS
    storage = settings.workdir / "replay"
    chosen = os.environ.get("REPLAY_VARIANTS")
    variants = tuple(chosen.split(",")) if chosen else COMPARED
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "random" not in variants:
        raise ValueError(f"REPLAY_VARIANTS: give 'random' and any of {list(VARIANTS)}")
    tasks = [(variant, seed) for seed in seeds for variant in variants]
    slots = {replay_slot(driver): REPLAY_CONCURRENCY for driver in range(REPLAY_DRIVERS)}
    # Ray starts idle workers for each driver ahead of need; a replay's trial workers
    # are its own actors, so those would only take CPU from the searches.
    with scoped_environment(RAY_enable_worker_prestart="0"), private_ray(slots):
        # Held here: the actors live as long as these handles, and the searches find
        # them by name.
        server: Any = (
            ray.remote(num_cpus=0)(CurveServer)
            .options(name=CURVE_SERVER, namespace=REPLAY_NAMESPACE)
            .remote(surrogate)
        )
        line: Any = (
            ray.remote(num_cpus=0)(StartLine)
            .options(name=START_LINE, namespace=REPLAY_NAMESPACE)
            .remote()
        )
        ray.get([server.__ray_ready__.remote(), line.__ray_ready__.remote()])
        timelines = run_searches(tasks, max(budgets), storage)
    series = {
        variant: [anytime(timelines[variant, seed]) for seed in seeds] for variant in variants
    }

    rows, summary = [], {}
    for budget in budgets:
        random_best = [at_budget(run, budget)[0] for run in series["random"]]
        random_volume = [at_budget(run, budget)[1] for run in series["random"]]
        defaults = [at_budget(run, budget)[1] for run in series.get("cxrtune", [])]
        for variant in variants:
            reached = [
                share_to_reach(run, target, budget)
                for run, target in zip(series[variant], random_best, strict=True)
            ]
            shares = [share for share, _ in reached]
            volumes = [at_budget(run, budget)[1] for run in series[variant]]
            beats = float(np.mean([v > r for v, r in zip(volumes, random_volume, strict=True)]))
            low, median, high = quartiles(shares)
            summary[f"{variant}@{budget}"] = {
                "share_median": median,
                "share_iqr": [low, high],
                "hypervolume_median": float(statistics.median(volumes)),
                "beats_random": beats,
            }
            against = ""
            if VARIANTS[variant][2] and defaults:  # a one-change variant
                better, worse, p_value = paired(volumes, defaults)
                summary[f"{variant}@{budget}"]["against_defaults"] = {
                    "better": better,
                    "worse": worse,
                    "wilcoxon_p": p_value,
                }
                against = f"  vs cxrtune: better {better}, worse {worse}, p {p_value:.2f}"
            print(
                f"budget {budget:4d} {variant:<12} share {median:.2f} [{low:.2f}, {high:.2f}]"
                f"  hypervolume {statistics.median(volumes):.3f}  beats random {beats:.0%}"
                f"{against}",
                flush=True,
            )
            if variant == "random":
                continue
            is_goal = variant == "cxrtune" and budget == max(BUDGETS)
            censored = any(not ok and s <= median for s, ok in reached)
            rows.append(
                Row(
                    case=f"{variant} @ {budget}: share of budget to reach random's best",
                    figure=median,
                    figure_kind="fraction of budget",
                    goal=SHARE_GOAL if is_goal else None,
                    candidate=Side(variant, "share", shares),
                    censored=censored,
                    notes=f"IQR [{low:.2f}, {high:.2f}], {len(seeds)} seeds",
                )
            )
            rows.append(
                Row(
                    case=f"{variant} @ {budget}: hypervolume beats random",
                    figure=beats,
                    figure_kind="fraction of seeds",
                    goal=BEATS_GOAL if is_goal else None,
                    candidate=Side(variant, "hypervolume", volumes),
                    baseline=Side("random", "hypervolume", random_volume),
                )
            )
    # A smoke run's plot means nothing: it stays in the scratch folder.
    # A selection of variants gets a plot of its own, next to the comparison's.
    name = PLOT.name if variants == COMPARED else f"{PLOT.stem}-variants{PLOT.suffix}"
    plot = settings.workdir / name if settings.quick else PLOT.with_name(name)
    plot_anytime(series, plot)
    return BenchmarkResult(
        rows=rows,
        details={
            "recorded_rows": len(table),
            "recorded_configs": int(table["config_id"].nunique()),
            "surrogate_held_out_fit": fit,
            "seed_spread": surrogate.spread,
            "epoch_cost": surrogate.epoch_cost,
            "summary": summary,
            "plot": str(plot),
        },
    )
