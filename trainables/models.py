"""The model registry: one builder per family, ``create_model`` is the one door.

Every model takes a batch ``B x 1 x H x W`` of normalised grayscale images and
returns ``B x num_classes`` logits.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cxrtune.spaces import Registry
from cxrtune.trainables.config import VGG16_BLOCKS, TrialConfig

__all__ = [
    "GRAY_MEAN",
    "GRAY_STD",
    "MODELS",
    "ModelBuilder",
    "StateDict",
    "VGG16Classifier",
    "WeightsUnavailableError",
    "create_model",
    "load_vgg16_features",
    "read_vgg16_weights",
    "register_model",
    "resolve_vgg16_weights",
]

# A state dict: parameter name -> tensor.
StateDict = dict[str, torch.Tensor]
# (config, number of classes, image size, pretrained state dict or None) -> model
ModelBuilder = Callable[[TrialConfig, int, int, StateDict | None], nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model family")

# ImageNet statistics of the luminance channel; pretrained VGG16 expects inputs
# normalised this way, and the small CNNs train just as well with them.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had, or do not fit the model."""


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a family's builder under ``name``; a second use of a name is an error."""
    return MODELS.register(name)


def create_model(
    config: TrialConfig, num_classes: int, image_size: int, pretrained: StateDict | None = None
) -> nn.Module:
    """Build the model ``config.family`` names; unknown families raise listing the known ones.

    ``pretrained`` holds the pretrained weights ``config.weights`` names, read on
    the driver (``read_vgg16_weights``); only families that have them take them.

    The model comes in channels-last memory format, which makes its convolutions
    about 1.3x faster on CPU and lets GPUs use their tensor-core kernels.
    """
    model = MODELS.lookup(config.family)(config, num_classes, image_size, pretrained)
    return model.to(memory_format=torch.channels_last)


def _conv_block(in_channels: int, out_channels: int, *, batch_norm: bool) -> list[nn.Module]:
    if batch_norm:
        return [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


def _small_cnn(
    num_classes: int, image_size: int, *, batch_norm: bool, dropout: float
) -> nn.Sequential:
    """Three conv/max-pool stages (32, 64, 128 channels) and a 128-unit dense layer."""
    if image_size % 8:
        raise ValueError(f"the small CNNs need an image size divisible by 8, got {image_size}")
    return nn.Sequential(
        *_conv_block(1, 32, batch_norm=batch_norm),
        *_conv_block(32, 64, batch_norm=batch_norm),
        *_conv_block(64, 128, batch_norm=batch_norm),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(128 * (image_size // 8) ** 2, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(128, num_classes),
    )


def _no_pretrained_weights(config: TrialConfig, pretrained: StateDict | None) -> None:
    if pretrained is not None:
        raise ValueError(f"{config.family} has no pretrained weights to load")


@register_model("baseline_cnn")
def baseline_cnn(
    config: TrialConfig, num_classes: int, image_size: int, pretrained: StateDict | None
) -> nn.Module:
    """The original study's plain CNN: no batch norm, no dropout; the control."""
    _no_pretrained_weights(config, pretrained)
    return _small_cnn(num_classes, image_size, batch_norm=False, dropout=0.0)


@register_model("regularized_cnn")
def regularized_cnn(
    config: TrialConfig, num_classes: int, image_size: int, pretrained: StateDict | None
) -> nn.Module:
    """The same trunk with batch norm and dropout; L2 comes from the optimizer's weight decay."""
    _no_pretrained_weights(config, pretrained)
    return _small_cnn(num_classes, image_size, batch_norm=True, dropout=config.dropout)


class VGG16Classifier(nn.Module):
    """VGG16 on one-channel input with a global-average-pool head.

    The first ``5 - finetune_blocks`` conv blocks are frozen and run without
    autograd, which is what makes head-only and shallow fine-tuning cheap.
    """

    def __init__(
        self, features: nn.Sequential, num_classes: int, dropout: float, finetune_blocks: int
    ):
        super().__init__()
        blocks = _split_vgg_blocks(features)
        frozen_count = VGG16_BLOCKS - finetune_blocks
        self.frozen = nn.Sequential(*[layer for block in blocks[:frozen_count] for layer in block])
        self.trainable = nn.Sequential(
            *[layer for block in blocks[frozen_count:] for layer in block]
        )
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.frozen(images)
        return self.head(self.trainable(features))


def _split_vgg_blocks(features: nn.Sequential) -> list[list[nn.Module]]:
    """Cut torchvision's flat VGG ``features`` into its five blocks, each ending in a max-pool."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in features:
        blocks[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
    blocks = [block for block in blocks if block]
    if len(blocks) != VGG16_BLOCKS:
        raise ValueError(f"expected {VGG16_BLOCKS} VGG blocks, found {len(blocks)}")
    return blocks


def load_vgg16_features(pretrained: StateDict | None = None) -> nn.Sequential:
    """torchvision's VGG16 conv trunk, with its first conv turned to one input channel.

    ``pretrained`` is a state dict of the trunk (``read_vgg16_weights`` gives one),
    or ``None`` for torchvision's random initialisation. The RGB kernels of the
    first conv are summed, so a gray image gives the response the RGB network
    gave to the same gray image.
    """
    # Imported here: a small-CNN trial starts almost a second sooner without torchvision.
    from torchvision.models import vgg16 as torchvision_vgg16

    # Built on the meta device, which holds no memory and runs no initialisation: only
    # the conv trunk gets real tensors, the 120M-parameter classifier is thrown away.
    with torch.device("meta"):
        trunk = torchvision_vgg16(weights=None).features
    features = trunk.to_empty(device="cpu")
    if pretrained is not None:
        features.load_state_dict(pretrained)
    else:
        for layer in features:
            if isinstance(layer, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    first = features[0]
    assert isinstance(first, nn.Conv2d) and first.kernel_size == (3, 3)
    gray = nn.Conv2d(1, first.out_channels, kernel_size=3, padding=1)
    with torch.no_grad():
        gray.weight.copy_(first.weight.sum(dim=1, keepdim=True))
        assert first.bias is not None and gray.bias is not None
        gray.bias.copy_(first.bias)
    features[0] = gray
    return features


@register_model("vgg16")
def vgg16(
    config: TrialConfig, num_classes: int, image_size: int, pretrained: StateDict | None
) -> nn.Module:
    """torchvision VGG16, ``config.finetune_blocks`` of its last conv blocks trained.

    A config naming pretrained ``weights`` needs their state dict in ``pretrained``:
    the trial never opens the file itself, which is on the driver's machine.
    """
    if image_size < 32:
        raise ValueError(f"vgg16 needs images of at least 32 px, got {image_size}")
    if config.weights != "none" and pretrained is None:
        raise WeightsUnavailableError(
            f"the trial config names VGG16 weights {config.weights!r}, but their state dict "
            "was not handed to the trial"
        )
    if config.weights == "none" and pretrained is not None:
        raise ValueError("pretrained VGG16 weights were handed to a trial whose weights are none")
    try:
        features = load_vgg16_features(pretrained)
    except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen keys
        raise WeightsUnavailableError(
            f"VGG16 weights {config.weights} do not fit the VGG16 trunk: {error}"
        ) from error
    return VGG16Classifier(features, num_classes, config.dropout, config.finetune_blocks)


def read_vgg16_weights(path: str) -> StateDict:
    """The VGG16 conv-trunk state dict in the file at ``path``, on the CPU.

    The file holds a state dict of the whole torchvision VGG16 (as
    ``VGG16_Weights.IMAGENET1K_V1`` ships it) or of its ``features`` alone; only
    the trunk is kept. Read on the driver, once per sweep; trials get the result
    through Ray's object store. A file that is not such a state dict raises
    ``WeightsUnavailableError`` naming it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsUnavailableError(f"{path} is not a VGG16 state dict: {error}") from error
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} is not a VGG16 state dict: it holds a {type(state)}")
    prefix = "features."
    if any(key.startswith(prefix) for key in state):
        state = {
            key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
        }
    try:  # checked here, so a bad file fails the sweep and not every trial
        load_vgg16_features(state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise WeightsUnavailableError(f"{path} is not a VGG16 state dict: {error}") from error
    return state


def resolve_vgg16_weights(spec: str) -> str:
    """Turn a sweep's ``weights`` setting into ``"none"`` or the file the driver reads.

    ``imagenet`` means torchvision's ``VGG16_Weights.IMAGENET1K_V1``, fetched once
    into torch's hub cache on the driver so that no trial downloads anything.
    When it cannot be fetched (an offline machine), the error says where to put
    the file by hand.
    """
    if spec == "none":
        return "none"
    if spec != "imagenet":
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"vgg16 weights file not found: {path}")
        return str(path)

    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except OSError as error:
        raise WeightsUnavailableError(
            f"could not download the ImageNet VGG16 weights ({error}).\n"
            f"On an offline machine, copy {url}\n"
            f"to {target} (or point TORCH_HOME at a folder holding checkpoints/{target.name}),\n"
            "or set `weights:` in the sweep file to the path of a VGG16 state dict, "
            "or to `none` to train from scratch."
        ) from error
    return str(target)
