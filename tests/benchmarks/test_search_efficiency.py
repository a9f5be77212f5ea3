"""The replay benchmark's arithmetic: hypervolume, anytime bests, shares (issue item 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmarks._surrogate import TARGETS, fit_surrogate, held_out_fit, seed_spread
from benchmarks.record_curves import MAX_EPOCHS
from benchmarks.search_efficiency import anytime, at_budget, hypervolume, share_to_reach


def record(trial: str, cost: float, recall: float, auc: float) -> dict[str, float | str]:
    return {"trial": trial, "cost": cost, TARGETS[0]: recall, TARGETS[1]: auc}


def test_hypervolume_of_a_staircase_by_hand() -> None:
    # (0.5, 0.9) covers 0.45; (0.8, 0.6) adds 0.3 x 0.6 = 0.18; (0.4, 0.5) is dominated.
    assert hypervolume([(0.5, 0.9), (0.8, 0.6), (0.4, 0.5)]) == pytest.approx(0.63)
    assert hypervolume([]) == 0.0


def test_a_trial_counts_at_its_best_auc_epoch_not_its_best_recall() -> None:
    series = anytime([record("a", 1, 0.9, 0.6), record("a", 2, 0.2, 0.8), record("b", 3, 0.5, 0.7)])
    assert [best for _, best, _ in series] == [0.9, 0.2, 0.5]
    assert at_budget(series, 2.5) == (0.2, pytest.approx(0.2 * 0.8))


def test_the_share_is_the_cost_of_first_reaching_the_target_or_one_censored() -> None:
    series = [(10.0, 0.3, 0.0), (30.0, 0.6, 0.0), (90.0, 0.8, 0.0)]
    assert share_to_reach(series, 0.5, 100) == (0.3, True)
    assert share_to_reach(series, 0.9, 100) == (1.0, False)
    assert share_to_reach(series, 0.8, 50) == (1.0, False)  # reached only past the budget


def recorded_table(configs: int = 24) -> pd.DataFrame:
    """Curves whose AUC rises with the learning rate, two seeds of the first four configs."""
    rng = np.random.default_rng(0)
    rows = []
    for config_id in range(configs):
        lr = 10 ** rng.uniform(-4, -2)
        for seed in (0, 1) if config_id < 4 else (0,):
            for epoch in range(1, MAX_EPOCHS + 1):
                quality = (np.log10(lr) + 4) / 2 * epoch / MAX_EPOCHS
                rows.append(
                    {
                        "config_id": config_id,
                        "seed": seed,
                        "epoch": epoch,
                        "family": ["baseline_cnn", "vgg16"][config_id % 2],
                        "lr": lr,
                        "batch_size": 32,
                        "imbalance": "none",
                        "dropout": 0.0,
                        "weight_decay": 0.0,
                        "augment_strength": 0.0,
                        "finetune_blocks": 0,
                        TARGETS[0]: quality * 0.8 + 0.01 * seed,
                        TARGETS[1]: 0.5 + quality * 0.4,
                        "epoch_time_s": [1.0, 3.0][config_id % 2],
                    }
                )
    return pd.DataFrame(rows)


def test_the_surrogate_fits_held_out_configs_and_knows_the_seed_spread() -> None:
    table = recorded_table()
    fit = held_out_fit(table, folds=3)
    assert fit[TARGETS[1]]["spearman"] > 0.8
    assert seed_spread(table)[TARGETS[0]] == pytest.approx(np.std([0.0, 0.01], ddof=1))
    surrogate = fit_surrogate(table)
    assert surrogate.epoch_cost == {"baseline_cnn": 0.5, "vgg16": 1.5}
    curve = surrogate.curve(table.iloc[0].to_dict(), np.random.default_rng(0))
    assert list(curve["epoch"]) == list(range(1, MAX_EPOCHS + 1))
    assert min(curve[target].min() for target in TARGETS) >= 0.0


class Constant:
    """A stand-in regressor: predicts ``value`` for every row."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return np.full(len(inputs), self.value)


def test_a_replayed_trial_reports_the_same_curve_for_the_same_config_each_epoch() -> None:
    """Issue item 3 (a fast replay): a reused replay actor rebuilds the curve per config."""
    from benchmarks._surrogate import Surrogate
    from benchmarks.search_efficiency import replay_curve

    surrogate = Surrogate(
        models={TARGETS[0]: Constant(0.5), TARGETS[1]: Constant(0.7)},
        spread={TARGETS[0]: 0.1, TARGETS[1]: 0.0},
        epoch_cost={"vgg16": 2.5},
    )
    config = {
        "family": "vgg16",
        "lr": 1e-3,
        "batch_size": 32,
        "imbalance": "none",
        "dropout": 0.2,
        "weight_decay": 1e-4,
        "augment_strength": 0.3,
        "finetune_blocks": 1,
        "max_epochs": MAX_EPOCHS,
    }
    curve = replay_curve(config, surrogate)
    assert [row["epoch"] for row in curve] == list(range(1, MAX_EPOCHS + 1))
    assert all(row["cost"] == 2.5 and row[TARGETS[1]] == pytest.approx(0.7) for row in curve)
    # One offset per trial: the whole curve moves together, and again for the same config.
    assert len({row[TARGETS[0]] for row in curve}) == 1
    assert replay_curve(config, surrogate) == curve
    assert replay_curve({**config, "lr": 2e-3}, surrogate) != curve


def orphan(pids: Any) -> None:
    """Start a child that watches this process, and die as a killed process does once it does."""
    import multiprocessing
    import os

    context = multiprocessing.get_context("spawn")
    watching = context.Event()
    child = context.Process(target=sleep_watching_parent, args=(watching,))
    child.start()
    watching.wait(60)
    pids.put(child.pid)
    pids.close()
    pids.join_thread()
    os._exit(0)  # no clean-up: a clean exit would join (wait for) the child


def sleep_watching_parent(watching: Any) -> None:
    import os
    import time

    from benchmarks.search_efficiency import exit_with_parent

    exit_with_parent(os.getppid())
    watching.set()
    time.sleep(120)


def test_a_search_process_ends_when_the_benchmark_that_started_it_is_gone() -> None:
    """An interrupted replay leaves no search process running on its own."""
    import multiprocessing
    import time

    import psutil

    context = multiprocessing.get_context("spawn")
    pids = context.Queue()
    parent = context.Process(target=orphan, args=(pids,))
    parent.start()
    child = pids.get(timeout=60)
    parent.join(timeout=60)
    assert parent.exitcode == 0
    deadline = time.monotonic() + 30
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"search process {child} outlived its parent"
        time.sleep(0.2)


def test_the_start_line_holds_a_search_until_all_its_workers_arrive() -> None:
    """Each search runs its trials four at a time from the start, on four workers only."""
    import asyncio

    from benchmarks._replay import StartLine

    async def race() -> list[object]:
        line = StartLine()
        first = asyncio.ensure_future(line.arrive("search-a", 3))
        second = asyncio.ensure_future(line.arrive("search-a", 3))
        other = asyncio.ensure_future(line.arrive("search-b", 1))  # its own line
        await asyncio.sleep(0.05)
        held = [first.done(), second.done(), other.done()]
        third = await line.arrive("search-a", 3)
        return [held, await first, await second, third, await other]

    held, *released = asyncio.run(race())
    assert held == [False, False, True]
    assert released == [True, True, True, True]


def test_a_worker_whose_peers_never_come_starts_alone_after_the_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from benchmarks import _replay

    monkeypatch.setattr(_replay, "START_TIMEOUT_S", 0.05)
    assert asyncio.run(_replay.StartLine().arrive("search-a", 4)) is False


def test_a_variant_is_compared_with_the_defaults_seed_by_seed() -> None:
    from benchmarks.search_efficiency import paired

    defaults = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, 0.2]
    better, worse, p_value = paired([v + 0.05 for v in defaults], defaults)
    assert (better, worse) == (8, 0)
    assert p_value < 0.01  # eight wins of eight
    assert paired(defaults, defaults) == (0, 0, 1.0)
    mixed = paired([0.6, 0.5, 0.8, 0.7], [0.5, 0.6, 0.7, 0.8])
    assert mixed[:2] == (2, 2) and mixed[2] > 0.5
