"""input_pipeline: cxrtune's in-memory uint8 batches vs ImageFolder + DataLoader + PIL.

Both sides read the same synthetic PNGs (written at 224 px) and produce
normalised, augmented float batches of the same size; no model runs. cxrtune's
side starts after ``ingest`` (decoded once, then cached), as every trial does;
the usual recipe decodes, augments and resizes every image every epoch in
``cores`` worker processes, which are kept alive between epochs (its best case).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from benchmarks._harness import (
    BenchmarkResult,
    Goal,
    Settings,
    Side,
    interleave,
    ratio_row,
    register_benchmark,
)

AUGMENT_STRENGTH = 0.5  # the middle of the quick space's range; both sides use it
BATCH_SIZE = 64
SIZES = (128, 224)  # pixels per side the batches have
SOURCE_SIZE = 224  # pixels per side of the PNGs on disk
GOAL = Goal(">=", 3.0)


def imagefolder_loader(root: Path, size: int, workers: int) -> torch.utils.data.DataLoader:
    """The usual recipe, with PIL transforms of the same strength as ``augment_batch``."""
    from torchvision import datasets, transforms

    from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD

    s = AUGMENT_STRENGTH
    # Grayscale and Resize first: the augmentations then work on the smaller image,
    # which is the cheaper order and so the baseline's best case.
    transform = transforms.Compose(
        [
            transforms.Grayscale(num_output_channels=1),
            transforms.Resize((size, size)),
            transforms.RandomAffine(
                degrees=15 * s,
                translate=(0.1 * s, 0.1 * s),
                scale=(1 - 0.15 * s, 1 + 0.15 * s),
                # Bilinear, as augment_batch samples (RandomAffine's default is nearest).
                interpolation=transforms.InterpolationMode.BILINEAR,
            ),
            transforms.ColorJitter(brightness=0.2 * s, contrast=0.3 * s),
            transforms.ToTensor(),
            transforms.Normalize([GRAY_MEAN], [GRAY_STD]),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
    )


def loader_images_per_second(loader: torch.utils.data.DataLoader) -> float:
    started = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - started)


def tensor_images_per_second(images: torch.Tensor, generator: torch.Generator) -> float:
    """One epoch of shuffled batches through ``to_model_input``, as ``train_one_epoch`` does."""
    from cxrtune.trainables.engine import to_model_input

    started = time.perf_counter()
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order), BATCH_SIZE):
        to_model_input(images[order[start : start + BATCH_SIZE]], AUGMENT_STRENGTH, generator)
    return len(images) / (time.perf_counter() - started)


@register_benchmark(
    "input_pipeline",
    "uint8 tensor + to_model_input vs ImageFolder + DataLoader + PIL transforms, images/s",
)
def input_pipeline(settings: Settings) -> BenchmarkResult:
    from cxrtune.trainables.data import ingest
    from cxrtune.trainables.synthetic import write_synthetic_dataset

    count = 300 if settings.quick else 2000
    root = settings.workdir / "input_pipeline" / "images"
    started = time.perf_counter()
    write_synthetic_dataset(root, n=count, size=SOURCE_SIZE, seed=0)
    result = BenchmarkResult(
        details={
            "images": count,
            "source_size_px": SOURCE_SIZE,
            "batch_size": BATCH_SIZE,
            "augment_strength": AUGMENT_STRENGTH,
            "torch_threads": torch.get_num_threads(),
            "dataloader_workers": settings.cores,
            "write_pngs_s": time.perf_counter() - started,
            "ingest_s": {},
        }
    )
    generator = torch.Generator().manual_seed(0)
    for size in SIZES:
        started = time.perf_counter()
        dataset = ingest(
            root, size, cache_dir=settings.workdir / "input_pipeline" / "cache"
        ).dataset
        result.details["ingest_s"][f"{size}px"] = time.perf_counter() - started
        images = torch.from_numpy(dataset.images)
        loader = imagefolder_loader(root, size, settings.cores)
        # One untimed epoch each: worker start-up, page cache and allocator warm-up.
        loader_images_per_second(loader)
        tensor_images_per_second(images, generator)
        baseline, candidate = interleave(
            partial(loader_images_per_second, loader),
            partial(tensor_images_per_second, images, generator),
            settings.repeats,
        )
        del loader  # ends its worker processes before the next size
        result.rows.append(
            ratio_row(
                f"{size} px",
                Side(f"ImageFolder + DataLoader ({settings.cores} workers)", "images/s", baseline),
                Side("uint8 tensor + to_model_input", "images/s", candidate),
                GOAL,
                notes=f"augment_strength {AUGMENT_STRENGTH}, batch {BATCH_SIZE}, {count} images",
            )
        )
    return result
