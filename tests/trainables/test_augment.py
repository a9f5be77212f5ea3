from __future__ import annotations

import pytest
import torch

from cxrtune.trainables.augment import augment_batch


def batch(count: int = 8, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(count, 1, size, size)


def test_strength_zero_leaves_the_batch_untouched() -> None:
    images = batch()
    assert augment_batch(images, 0.0) is images


def test_augmented_images_keep_their_shape_and_range() -> None:
    out = augment_batch(batch(), 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 32, 32)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_each_image_gets_its_own_transform() -> None:
    same = batch(1).expand(6, 1, 32, 32).clone()
    out = augment_batch(same, 1.0, torch.Generator().manual_seed(0))
    differences = [(out[0] - out[i]).abs().mean().item() for i in range(1, 6)]
    assert min(differences) > 1e-3


def test_augmentation_is_reproducible_with_a_seeded_generator() -> None:
    first = augment_batch(batch(), 0.5, torch.Generator().manual_seed(3))
    second = augment_batch(batch(), 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_stronger_augmentation_changes_images_more() -> None:
    images = batch(64)
    change = [
        (augment_batch(images, s, torch.Generator().manual_seed(0)) - images).abs().mean().item()
        for s in (0.1, 0.5, 1.0)
    ]
    assert change[0] < change[1] < change[2]


def test_no_horizontal_flip_by_default() -> None:
    # A left-bright image stays left-bright at full strength: the heart stays on the left.
    images = torch.zeros(16, 1, 32, 32)
    images[..., :12] = 1.0
    out = augment_batch(images, 1.0, torch.Generator().manual_seed(0))
    assert (out[..., :8].mean(dim=(1, 2, 3)) > out[..., -8:].mean(dim=(1, 2, 3))).all()
    flipped = augment_batch(images, 1.0, torch.Generator().manual_seed(0), horizontal_flip=True)
    assert (flipped[..., :8].mean(dim=(1, 2, 3)) < flipped[..., -8:].mean(dim=(1, 2, 3))).any()


def test_strength_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="strength"):
        augment_batch(batch(), 1.5)
