from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxrtune.analysis.export import ExportedModel
from cxrtune.analysis.gradcam import (
    gradcam,
    model_gradcam,
    overlay_heatmap,
    write_gradcam_overlays,
)
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import to_model_input
from cxrtune.trainables.models import VGG16Classifier, create_model
from tests.conftest import write_png

CLASSES = ("COVID", "Normal")


def tiny_model(family: str, size: int, finetune_blocks: int = 0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = TrialConfig(
        family=family, lr=1e-3, batch_size=8, imbalance="none", finetune_blocks=finetune_blocks
    )
    return create_model(config, len(CLASSES), size)


def exported(*members: nn.Module, size: int) -> ExportedModel:
    return ExportedModel(
        directory=Path("unused"),
        members=members,
        class_names=CLASSES,
        positive_index=0,
        threshold=0.5,
        image_size=size,
        description={},
    )


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1, size, size), dtype=np.uint8)


FAMILIES = [
    pytest.param("baseline_cnn", 16, 0, id="baseline_cnn"),
    pytest.param("regularized_cnn", 16, 0, id="regularized_cnn"),
    pytest.param("vgg16", 32, 0, id="vgg16-head-only"),  # the last conv is frozen
    pytest.param("vgg16", 32, 2, id="vgg16-two-blocks"),
]


@pytest.mark.parametrize(("family", "size", "finetune_blocks"), FAMILIES)
def test_every_family_gives_an_image_sized_non_blank_heatmap_in_0_1(
    family: str, size: int, finetune_blocks: int
) -> None:
    model = tiny_model(family, size, finetune_blocks)
    images = random_images(3, size)

    # The predicted class: an untrained model may have no positive evidence for another
    # class anywhere, and Grad-CAM then rightly gives a blank map.
    heatmaps, _ = model_gradcam(exported(model, size=size), images)

    assert heatmaps.shape == (3, size, size)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert all(heatmap.max() - heatmap.min() > 0.1 for heatmap in heatmaps)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not model.training


@pytest.mark.parametrize(("family", "size", "finetune_blocks"), FAMILIES)
def test_the_heatmap_changes_when_the_image_changes(
    family: str, size: int, finetune_blocks: int
) -> None:
    model = exported(tiny_model(family, size, finetune_blocks), size=size)
    (first, second), _ = model_gradcam(model, random_images(2, size, seed=1))
    assert np.abs(first - second).max() > 0.1


def blob_images(rng: np.random.Generator, count: int, size: int, blob: bool) -> tuple:
    """Dark noise; with ``blob``, a bright disc of radius 3 somewhere inside. Also the centres."""
    images = rng.integers(0, 60, (count, 1, size, size)).astype(np.uint8)
    rows, columns = np.mgrid[:size, :size]
    centres = rng.integers(5, size - 5, (count, 2))
    if blob:
        for image, (row, column) in zip(images, centres, strict=True):
            image[0][(rows - row) ** 2 + (columns - column) ** 2 <= 9] = 255
    return images, centres


def test_the_heatmap_of_a_model_trained_to_find_a_bright_blob_peaks_at_the_blob() -> None:
    size = 32
    rng = np.random.default_rng(0)
    with_blob, _ = blob_images(rng, 64, size, blob=True)
    without_blob, _ = blob_images(rng, 64, size, blob=False)
    images = torch.from_numpy(np.concatenate([with_blob, without_blob]))
    labels = torch.tensor([0] * 64 + [1] * 64)
    model = tiny_model("baseline_cnn", size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        batch = torch.randint(0, len(labels), (32,))
        loss = F.cross_entropy(model(to_model_input(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    test_images, centres = blob_images(np.random.default_rng(1), 8, size, blob=True)
    heatmaps = gradcam(model, test_images, [0] * 8)

    peaks = np.array([np.unravel_index(heatmap.argmax(), heatmap.shape) for heatmap in heatmaps])
    assert np.hypot(*(peaks - centres).T).max() <= 4


def test_an_ensemble_explains_its_own_predicted_class_with_the_mean_of_its_members_maps() -> None:
    members = (tiny_model("baseline_cnn", 16, seed=1), tiny_model("regularized_cnn", 16, seed=2))
    model = exported(*members, size=16)
    images = random_images(4, 16)

    heatmaps, targets = model_gradcam(model, images)

    assert targets.tolist() == model.predict_proba(images).argmax(axis=1).tolist()
    mean = np.mean([gradcam(member, images, targets) for member in members], axis=0)
    low = mean.min(axis=(1, 2), keepdims=True)
    high = mean.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(heatmaps, (mean - low) / (high - low), atol=1e-6)
    _, covid_targets = model_gradcam(model, images, class_index=0)
    assert covid_targets.tolist() == [0, 0, 0, 0]


def test_the_overlay_is_red_where_the_heatmap_is_hot_and_blue_where_it_is_cold() -> None:
    gray = np.full((4, 6), 128, dtype=np.uint8)
    heatmap = np.zeros((4, 6), dtype=np.float32)
    heatmap[:, :3] = 1.0

    overlay = overlay_heatmap(gray, heatmap)

    assert overlay.shape == (4, 6, 3) and overlay.dtype == np.uint8
    hot, cold = overlay[0, 0].astype(int), overlay[0, -1].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_overlays_are_written_at_each_files_resolution_with_distinct_names(
    tmp_path: Path,
) -> None:
    model = exported(tiny_model("baseline_cnn", 16), size=16)
    rng = np.random.default_rng(0)
    first = write_png(tmp_path / "in" / "a" / "chest.png", rng.integers(0, 256, (24, 40), np.uint8))
    second = write_png(
        tmp_path / "in" / "b" / "chest.png", rng.integers(0, 256, (16, 16), np.uint8)
    )

    written = write_gradcam_overlays(model, [first, second], tmp_path / "out")

    assert [path.name for path in written] == ["chest_gradcam.png", "chest_2_gradcam.png"]
    for path, size in zip(written, [(40, 24), (16, 16)], strict=True):
        with Image.open(path) as overlay:
            assert overlay.mode == "RGB" and overlay.size == size
            pixels = np.asarray(overlay)
        assert pixels.reshape(-1, 3).std(axis=0).max() > 10


def test_an_unknown_class_to_explain_is_an_error_naming_the_classes(tmp_path: Path) -> None:
    model = exported(tiny_model("baseline_cnn", 16), size=16)
    with pytest.raises(ValueError, match=r"unknown class 'Flu'; classes: \['COVID', 'Normal'\]"):
        write_gradcam_overlays(model, [], tmp_path, class_name="Flu")


def test_a_model_of_another_kind_is_an_error() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

    with pytest.raises(ValueError, match=r"Grad-CAM supports nn\.Sequential and VGG16Classifier"):
        gradcam(Custom(), random_images(1, 8), [0])


def hooked_gradcam(model: nn.Module, feature_layer: nn.Module, images: np.ndarray) -> np.ndarray:
    """Grad-CAM of the predicted class the usual way: a forward hook and the model's ``forward``."""
    kept: list[torch.Tensor] = []
    handle = feature_layer.register_forward_hook(lambda module, args, output: kept.append(output))
    logits = model.eval()(to_model_input(torch.from_numpy(images)))
    handle.remove()
    targets = logits.argmax(dim=1)
    (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), kept[0])
    maps = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * kept[0]).sum(dim=1, keepdim=True))
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    return ((maps - low) / (high - low)).detach().numpy()


# The ReLU after each family's last conv (VGG16's conv5_3), picked by hand.
LAST_RELU = [
    pytest.param("baseline_cnn", 16, lambda model: model[7], id="baseline_cnn"),
    pytest.param("regularized_cnn", 16, lambda model: model[10], id="regularized_cnn"),
    pytest.param("vgg16", 32, lambda model: model.trainable[-2], id="vgg16-two-blocks"),
]


@pytest.mark.parametrize(("family", "size", "feature_layer"), LAST_RELU)
def test_heatmaps_match_grad_cam_computed_with_a_hook_on_the_models_own_forward(
    family: str, size: int, feature_layer: Callable[[nn.Module], nn.Module]
) -> None:
    model = tiny_model(family, size, finetune_blocks=2)
    images = random_images(3, size)
    expected = hooked_gradcam(model, feature_layer(model), images)
    heatmaps, _ = model_gradcam(exported(model, size=size), images)
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)


def test_head_only_vgg16_whose_last_conv_runs_without_autograd_gets_the_usual_heatmap() -> None:
    # One seed, so both hold the same weights and differ only in what runs without autograd.
    head_only, two_blocks = tiny_model("vgg16", 32, 0), tiny_model("vgg16", 32, 2)
    assert isinstance(two_blocks, VGG16Classifier)
    images = random_images(3, 32)
    expected = hooked_gradcam(two_blocks, two_blocks.trainable[-2], images)
    heatmaps, _ = model_gradcam(exported(head_only, size=32), images)
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)
