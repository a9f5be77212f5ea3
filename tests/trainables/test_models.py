from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision

from cxrtune.spaces import FAMILIES
from cxrtune.trainables import models
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.models import (
    MODELS,
    VGG16Classifier,
    WeightsUnavailableError,
    create_model,
    read_vgg16_weights,
    register_model,
    resolve_vgg16_weights,
)

IMAGE_SIZE = 32


def config_for(family: str, **changes: object) -> TrialConfig:
    base = TrialConfig(family=family, lr=1e-3, batch_size=4, imbalance="none", dropout=0.1)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_registered_model_maps_a_gray_batch_to_class_logits(family: str) -> None:
    model = create_model(config_for(family), num_classes=4, image_size=IMAGE_SIZE)
    logits = model(torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_registered_model_gets_gradients_in_its_trainable_parameters(family: str) -> None:
    model = create_model(
        config_for(family, finetune_blocks=1), num_classes=4, image_size=IMAGE_SIZE
    )
    model(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("finetune_blocks", range(6))
def test_vgg16_trains_exactly_the_last_finetune_blocks(finetune_blocks: int) -> None:
    model = create_model(
        config_for("vgg16", finetune_blocks=finetune_blocks), num_classes=4, image_size=IMAGE_SIZE
    )
    assert isinstance(model, VGG16Classifier)
    trainable_convs = [m for m in model.trainable if isinstance(m, torch.nn.Conv2d)]
    frozen_convs = [m for m in model.frozen if isinstance(m, torch.nn.Conv2d)]
    # VGG16's blocks hold 2, 2, 3, 3, 3 convs.
    assert len(trainable_convs) == sum([2, 2, 3, 3, 3][5 - finetune_blocks :])
    assert len(trainable_convs) + len(frozen_convs) == 13
    assert all(not p.requires_grad for p in model.frozen.parameters())
    assert all(p.requires_grad for p in model.trainable.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_vgg16_frozen_blocks_run_without_autograd() -> None:
    model = create_model(
        config_for("vgg16", finetune_blocks=0), num_classes=4, image_size=IMAGE_SIZE
    )
    seen = {}
    model.head.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    model(torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True))
    # No graph reaches the head through the frozen trunk: nothing was recorded for it.
    assert seen["x"].grad_fn is None


@pytest.mark.parametrize("saved", ["whole_model", "features_only"])
def test_vgg16_loads_a_state_dict_file_and_sums_the_rgb_kernels(tmp_path: Path, saved: str) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None)
    state = reference.state_dict() if saved == "whole_model" else reference.features.state_dict()
    path = tmp_path / "vgg16.pt"
    torch.save(state, path)

    model = create_model(
        config_for("vgg16", weights=str(path)),
        num_classes=4,
        image_size=IMAGE_SIZE,
        pretrained=read_vgg16_weights(str(path)),
    )
    first = model.frozen[0]
    expected = reference.features[0].weight.sum(dim=1, keepdim=True)
    assert first.weight.shape == (64, 1, 3, 3)
    assert torch.allclose(first.weight, expected)
    assert torch.equal(model.frozen[2].weight, reference.features[2].weight)


def test_vgg16_gray_input_matches_the_rgb_network_on_a_gray_image(tmp_path: Path) -> None:
    reference = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pt"
    torch.save(reference.state_dict(), path)
    features = models.load_vgg16_features(read_vgg16_weights(str(path)))
    gray = torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(
            features(gray), reference.features(gray.expand(1, 3, -1, -1)), atol=1e-4
        )


def test_a_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        resolve_vgg16_weights(str(tmp_path / "missing.pt"))


def test_imagenet_weights_offline_stop_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url: str, dst: str, progress: bool = True) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match=r"checkpoints/vgg16-397923af\.pth"):
        resolve_vgg16_weights("imagenet")


def test_imagenet_weights_already_in_the_hub_cache_are_used_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    assert resolve_vgg16_weights("imagenet") == str(cached)


def test_an_unknown_family_lists_the_known_ones() -> None:
    config = object.__new__(TrialConfig)
    object.__setattr__(config, "family", "resnet50")
    with pytest.raises(ValueError, match="baseline_cnn"):
        create_model(config, num_classes=4, image_size=IMAGE_SIZE)


def test_registering_a_family_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg16")(lambda config, classes, size: torch.nn.Identity())


def test_a_weights_file_that_is_not_a_vgg16_state_dict_is_refused_up_front(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="garbage"):
        read_vgg16_weights(str(garbage))
    wrong = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError, match="resnet"):
        read_vgg16_weights(str(wrong))


def test_a_valid_weights_file_resolves_to_its_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "vgg.pt"
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), path)
    assert resolve_vgg16_weights(str(path)) == str(path.resolve())


def test_a_vgg16_trial_naming_weights_without_their_state_dict_is_refused() -> None:
    """Item 1: a trial never falls back to opening the weights path itself."""
    config = config_for("vgg16", weights="/only/on/the/driver/vgg16.pt")
    with pytest.raises(WeightsUnavailableError, match="not handed to the trial"):
        create_model(config, num_classes=4, image_size=IMAGE_SIZE)


def test_weights_that_do_not_fit_the_vgg16_trunk_name_the_weights(tmp_path: Path) -> None:
    state = torchvision.models.vgg16(weights=None).features.state_dict()
    state["0.weight"] = torch.zeros(64, 3, 5, 5)
    config = config_for("vgg16", weights="vgg16-odd.pt")
    with pytest.raises(WeightsUnavailableError, match="vgg16-odd"):
        create_model(config, num_classes=4, image_size=IMAGE_SIZE, pretrained=state)


def test_the_model_registry_covers_exactly_the_families_the_spaces_search() -> None:
    assert set(MODELS) == set(FAMILIES)
