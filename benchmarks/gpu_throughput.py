"""gpu_throughput: ``train_one_epoch`` images/s on the GPU vs on every CPU core, per family.

Only where CUDA is available; elsewhere the benchmark is skipped with
``"skipped": "no GPU"``. As in a GPU trial, the uint8 images sit on the device
and are augmented there. No goal was set for it: the ratios are reported, not
judged.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from benchmarks._harness import (
    BenchmarkResult,
    Settings,
    Side,
    interleave,
    ratio_row,
    register_benchmark,
)
from benchmarks._trials import synthetic_trial_data
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.fit import TrialData

IMAGE_SIZE = 128
EPOCHS = 2  # the last one is timed
FAMILY_SETTINGS = {
    "baseline_cnn": {},
    "regularized_cnn": {"dropout": 0.3, "weight_decay": 1e-4, "augment_strength": 0.5},
    "vgg16": {"lr": 3e-4, "dropout": 0.3, "finetune_blocks": 2},
}


def images_per_second(config: TrialConfig, data: TrialData, device: torch.device) -> float:
    from cxrtune.trainables.engine import epoch_indices, train_one_epoch
    from cxrtune.trainables.fit import build_optimizer
    from cxrtune.trainables.models import create_model

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = create_model(config, len(data.class_names), data.image_size).to(device)
    optimizer = build_optimizer(config, model)
    images = torch.from_numpy(data.train_images).to(device)
    labels = torch.as_tensor(data.train_labels, dtype=torch.long, device=device)
    speed = 0.0
    for _ in range(EPOCHS):
        order = epoch_indices(data.train_labels, config.imbalance, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        train_one_epoch(
            model,
            optimizer,
            images,
            labels,
            order,
            batch_size=config.batch_size,
            augment_strength=config.augment_strength,
            generator=generator,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speed = len(order) / (time.perf_counter() - started)
    return speed


@register_benchmark(
    "gpu_throughput", "train_one_epoch images/s on the GPU vs every CPU core (GPU machines only)"
)
def gpu_throughput(settings: Settings) -> BenchmarkResult:
    if not torch.cuda.is_available():
        return BenchmarkResult(skipped="no GPU")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    result = BenchmarkResult(
        details={"gpu": torch.cuda.get_device_name(gpu), "cpu_threads": torch.get_num_threads()}
    )
    for family, family_settings in FAMILY_SETTINGS.items():
        train = (128 if settings.quick else 1024) // (4 if family == "vgg16" else 1)
        data = synthetic_trial_data(train, 32, IMAGE_SIZE, distinct=200)
        config = TrialConfig.from_dict(
            {"lr": 1e-3, "batch_size": 64, "imbalance": "none", "family": family} | family_settings
        )
        on_cpu, on_gpu = interleave(
            partial(images_per_second, config, data, cpu),
            partial(images_per_second, config, data, gpu),
            settings.repeats,
        )
        row = ratio_row(
            family,
            Side(f"CPU, {torch.get_num_threads()} threads", "images/s", on_cpu),
            Side("GPU", "images/s", on_gpu),
            goal=None,
            notes=f"{IMAGE_SIZE} px, {train} images, batch 64, last of {EPOCHS} epochs",
        )
        result.rows.append(row)
    return result
