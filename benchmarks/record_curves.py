"""Record learning curves for the search-efficiency replay: many configs, every epoch.

``python -m benchmarks.record_curves [--configs 300] [--repeats 30] [--out PATH]``

Draws ``--configs`` trial configs uniformly from the ``quick`` space over all
three families (Optuna's ``RandomSampler``, seed 0: the same list every run),
trains each for the full ``MAX_EPOCHS`` on a small synthetic set (32 px, a few
hundred training images) outside Ray, two processes at a time, one torch
thread each, and appends one row per epoch (config, seed, epoch, validation
metrics, epoch time) to a gzip CSV as each run finishes. The first
``--repeats`` configs are also trained with seeds 1 and 2, to measure how much
the curves move with the seed alone. An interrupted recording resumes: runs
already in the table are skipped.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from cxrtune.trainables.fit import TrialData

TABLE = Path(__file__).resolve().parent / "data" / "curves.csv.gz"
MAX_EPOCHS = 6
IMAGE_SIZE = 32
TRAIN_IMAGES = 320
VAL_IMAGES = 160
DATA_SEED = 0
CONFIG_SEED = 0
REPEAT_SEEDS = (1, 2)
# The metrics the replay needs, as every epoch reports them.
METRICS = (
    "val_covid_recall_at_spec",
    "val_macro_auc",
    "val_covid_recall",
    "val_accuracy",
    "val_loss",
    "train_loss",
    "epoch_time_s",
)
CONFIG_COLUMNS = (
    "family",
    "lr",
    "batch_size",
    "imbalance",
    "dropout",
    "weight_decay",
    "augment_strength",
    "finetune_blocks",
)


def draw_configs(count: int) -> list[dict[str, Any]]:
    """``count`` configs drawn uniformly from the ``quick`` space, all three families."""
    import optuna

    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.tuner import trial_space

    config = load_sweep_config(None, ["space=quick", f"max_epochs={MAX_EPOCHS}"])
    space = trial_space(config, "none")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=CONFIG_SEED))
    configs = []
    for _ in range(count):
        trial = study.ask()
        held = space(trial)
        configs.append({**trial.params, **held})
    return configs


def runs(configs: Sequence[dict[str, Any]], repeats: int) -> Iterator[tuple[int, int]]:
    """``(config id, seed)`` pairs; a repeated config's extra seeds follow it at once."""
    for index in range(len(configs)):
        yield index, 0
        if index < repeats:
            for seed in REPEAT_SEEDS:
                yield index, seed


@functools.cache
def recording_data() -> TrialData:
    """The synthetic set every run trains on, rendered once per process."""
    from benchmarks._trials import synthetic_trial_data

    return synthetic_trial_data(TRAIN_IMAGES, VAL_IMAGES, IMAGE_SIZE, seed=DATA_SEED)


def train_curve(config_id: int, config: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Train one config for ``MAX_EPOCHS`` in this process; one row per epoch."""
    import torch

    from cxrtune.trainables.config import TrialConfig
    from cxrtune.trainables.engine import epoch_indices, loss_class_weights, train_one_epoch
    from cxrtune.trainables.fit import build_optimizer, epoch_metrics
    from cxrtune.trainables.models import create_model

    torch.set_num_threads(1)
    data = recording_data()
    trial = TrialConfig.from_dict({**config, "seed": seed, "max_epochs": MAX_EPOCHS})
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = create_model(trial, len(data.class_names), data.image_size)
    optimizer = build_optimizer(trial, model)
    images = torch.from_numpy(data.train_images)
    labels = torch.as_tensor(data.train_labels, dtype=torch.long)
    val_images = torch.from_numpy(data.val_images)
    val_labels = torch.as_tensor(data.val_labels, dtype=torch.long)
    weights = loss_class_weights(data.train_labels, len(data.class_names), trial.imbalance)
    rows = []
    for epoch in range(1, MAX_EPOCHS + 1):
        started = time.perf_counter()
        order = epoch_indices(data.train_labels, trial.imbalance, generator)
        train_loss = train_one_epoch(
            model,
            optimizer,
            images,
            labels,
            order,
            batch_size=trial.batch_size,
            class_weights=weights,
            augment_strength=trial.augment_strength,
            generator=generator,
        )
        metrics = epoch_metrics(
            epoch, train_loss, model, val_images, val_labels, data, "fp32", started
        )
        row = {"config_id": config_id, "seed": seed, "epoch": epoch}
        row.update({name: config[name] for name in CONFIG_COLUMNS})
        row.update({name: metrics[name] for name in METRICS})
        rows.append(row)
    return rows


def recorded_runs(table: Path) -> set[tuple[int, int]]:
    """The ``(config id, seed)`` pairs the table already holds every epoch of."""
    if not table.exists():
        return set()
    frame = pd.read_csv(table)
    complete = frame.groupby(["config_id", "seed"])["epoch"].nunique() == MAX_EPOCHS
    return {(int(c), int(s)) for (c, s), done in complete.items() if done}


def append_rows(table: Path, rows: list[dict[str, Any]]) -> None:
    """Append one run's rows as a gzip member of its own (with a header if the file is new)."""
    frame = pd.DataFrame(rows)
    header = not table.exists()
    with gzip.open(table, "at") as file:
        frame.to_csv(file, index=False, header=header)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    configs = draw_configs(args.configs)
    done = recorded_runs(args.out)
    todo = [run for run in runs(configs, args.repeats) if run not in done]
    print(f"{len(done)} runs recorded, {len(todo)} to go -> {args.out}", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.processes) as pool:
        futures = {
            pool.submit(train_curve, config_id, configs[config_id], seed): (config_id, seed)
            for config_id, seed in todo
        }
        for count, future in enumerate(as_completed(futures), start=1):
            config_id, seed = futures[future]
            rows = future.result()
            append_rows(args.out, rows)
            seconds = sum(row["epoch_time_s"] for row in rows)
            print(
                f"[{time.perf_counter() - started:7.0f}s {count}/{len(todo)}] config {config_id} "
                f"seed {seed} {rows[0]['family']:<15} {seconds:6.1f}s "
                f"auc {rows[-1]['val_macro_auc']:.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
