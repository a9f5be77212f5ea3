from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrtune.trainables.augment import augment_batch, sampling_grid
from cxrtune.trainables.engine import to_model_input
from cxrtune.trainables.models import GRAY_MEAN, GRAY_STD


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


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (1, 7)])
def test_the_sampling_grid_is_the_one_affine_grid_builds(height: int, width: int) -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [5, 1, height, width], align_corners=False)
    torch.testing.assert_close(sampling_grid(theta, height, width), expected)


def test_raw_pixel_values_give_what_dividing_first_gives() -> None:
    raw = torch.randint(0, 256, (8, 1, 32, 32)).float()
    from_raw = augment_batch(raw, 0.7, torch.Generator().manual_seed(1), value_max=255.0)
    from_unit = augment_batch(raw / 255, 0.7, torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_raw, from_unit)


def reference_model_input(images: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """The transform spelled out step by step, as ``to_model_input`` must compute it."""
    generator = torch.Generator().manual_seed(seed)
    batch = images.float() / 255
    count = batch.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * scale * strength

    angle, zoom = uniform(math.radians(15.0)), 1 + uniform(0.15)
    shift_x, shift_y = uniform(0.2), uniform(0.2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    moved = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = uniform(0.2).view(-1, 1, 1, 1)
    contrast = (1 + uniform(0.3)).view(-1, 1, 1, 1)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    adjusted = ((moved - mean) * contrast + mean + brightness).clamp(0, 1)
    return (adjusted - GRAY_MEAN) / GRAY_STD


def test_model_input_is_the_step_by_step_transform() -> None:
    images = torch.randint(0, 256, (16, 1, 40, 40), dtype=torch.uint8)
    fast = to_model_input(images, 0.8, torch.Generator().manual_seed(2))
    torch.testing.assert_close(fast, reference_model_input(images, 0.8, 2), atol=1e-4, rtol=0)
