"""The engine in a plain loop, in a fresh process: trial_overhead's baseline.

``python -m benchmarks._plain_loop DATA.npz CONFIG_JSON`` trains as
``train_trial`` does (model, optimizer, per-epoch order, ``train_one_epoch``,
``evaluate``) with one torch thread and no Ray, and prints one JSON line: the
images and seconds of each epoch's ``train_one_epoch``. A fresh process, like
the trial's fresh actor, so neither side runs on the other's warm caches.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import epoch_indices, evaluate, loss_class_weights, train_one_epoch
from cxrtune.trainables.fit import TrialData, build_optimizer
from cxrtune.trainables.models import create_model


def save_trial_data(data: TrialData, path: Path) -> None:
    np.savez(
        path,
        train_images=data.train_images,
        train_labels=data.train_labels,
        val_images=data.val_images,
        val_labels=data.val_labels,
        class_names=np.array(data.class_names),
        positive_index=np.array(data.positive_index),
    )


def load_trial_data(path: Path) -> TrialData:
    with np.load(path) as arrays:
        return TrialData(
            train_images=arrays["train_images"],
            train_labels=arrays["train_labels"],
            val_images=arrays["val_images"],
            val_labels=arrays["val_labels"],
            class_names=tuple(str(name) for name in arrays["class_names"]),
            positive_index=int(arrays["positive_index"]),
        )


def train_plain(config: TrialConfig, data: TrialData) -> dict[str, list[float]]:
    """Per epoch: images seen by ``train_one_epoch`` and the seconds it took."""
    torch.set_num_threads(1)  # what a 1-CPU trial sets
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = create_model(config, len(data.class_names), data.image_size)
    optimizer = build_optimizer(config, model)
    images = torch.from_numpy(data.train_images)
    labels = torch.as_tensor(data.train_labels, dtype=torch.long)
    val_images = torch.from_numpy(data.val_images)
    val_labels = torch.as_tensor(data.val_labels, dtype=torch.long)
    weights = loss_class_weights(data.train_labels, len(data.class_names), config.imbalance)
    timings: dict[str, list[float]] = {"images": [], "seconds": []}
    for _ in range(config.max_epochs):
        order = epoch_indices(data.train_labels, config.imbalance, generator)
        started = time.perf_counter()
        train_one_epoch(
            model,
            optimizer,
            images,
            labels,
            order,
            batch_size=config.batch_size,
            class_weights=weights,
            augment_strength=config.augment_strength,
            generator=generator,
        )
        timings["seconds"].append(time.perf_counter() - started)
        timings["images"].append(len(order))
        evaluate(model, val_images, val_labels)  # as the trial does between epochs
    return timings


def main(argv: Sequence[str]) -> int:
    data_path, config_json = argv
    config = TrialConfig.from_dict(json.loads(config_json))
    print(json.dumps(train_plain(config, load_trial_data(Path(data_path)))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
