"""Grad-CAM heatmaps on the last conv layer of every family, and overlays saved as PNG.

Grad-CAM (Selvaraju et al., 2017): the gradient of a class logit with respect to
the last conv layer's rectified output ``A`` (``C x h x w``, after its batch norm
and ReLU), averaged over positions, weighs each channel:
``heatmap = ReLU(sum_k alpha_k A_k)``. It is upsampled to the image and scaled to
[0, 1] per image; a heatmap with no positive evidence for the class stays all zeros.

The model's layers are run one by one rather than through ``forward``, because
VGG16 runs its frozen blocks under ``torch.no_grad``: with head-only fine-tuning the
last conv is frozen and ``forward`` would give it no gradient. Only the layers after
``A`` need autograd, so the models themselves are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxrtune.analysis.export import ExportedModel
from cxrtune.trainables.data import read_gray, resize
from cxrtune.trainables.engine import to_model_input
from cxrtune.trainables.models import VGG16Classifier

__all__ = [
    "gradcam",
    "model_gradcam",
    "overlay_heatmap",
    "write_gradcam_overlays",
]

OVERLAY_ALPHA = 0.4  # weight of the colour map over the gray image
COLORMAP = "jet"


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in the order ``forward`` runs them."""
    if isinstance(model, VGG16Classifier):
        return [*model.frozen, *model.trainable, *model.head]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(
        f"Grad-CAM supports nn.Sequential and VGG16Classifier models, got {type(model).__name__}"
    )


def _feature_layer(layers: list[nn.Module]) -> int:
    """Index of the layer whose output Grad-CAM weighs: the ReLU after the last conv.

    Rectified feature maps, as the Grad-CAM paper's conv5_3 of VGG16 (after batch
    norm, where a family has it); the conv itself if no ReLU follows it.
    """
    last_conv = max(index for index, layer in enumerate(layers) if isinstance(layer, nn.Conv2d))
    return next(
        (index for index in range(last_conv, len(layers)) if isinstance(layers[index], nn.ReLU)),
        last_conv,
    )


def gradcam(model: nn.Module, images: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM of ``targets`` (one class index per image) on uint8 ``N x 1 x H x W`` images.

    Returns ``N x H x W`` float32 heatmaps in [0, 1]. The model is put in eval mode;
    its parameters get no gradient.
    """
    model.eval()
    layers = _layers(model)
    cut = _feature_layer(layers)
    device = next(model.parameters()).device
    writable = np.require(images, requirements=["C", "W"])  # torch wraps only writable arrays
    batch = to_model_input(torch.from_numpy(writable).to(device))
    with torch.no_grad():
        for layer in layers[: cut + 1]:
            batch = layer(batch)
    activations = batch.detach().requires_grad_(True)
    with torch.enable_grad():
        # A clone, since a later layer may work in place and A must keep its values.
        outputs = activations.clone()
        for layer in layers[cut + 1 :]:
            outputs = layer(outputs)
        chosen = torch.as_tensor(list(targets), dtype=torch.long, device=device)
        # Images are independent in eval mode, so one backward pass gives each its own gradient.
        target_logits = outputs.gather(1, chosen[:, None]).sum()
        (gradients,) = torch.autograd.grad(target_logits, activations)
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    heatmaps = F.relu((channel_weights * activations.detach()).sum(dim=1, keepdim=True))
    upsampled = F.interpolate(
        heatmaps, size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    return _scale_to_unit(upsampled[:, 0]).cpu().numpy().astype(np.float32)


def _scale_to_unit(heatmaps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own minimum and maximum; a flat map becomes zeros."""
    low = heatmaps.amin(dim=(1, 2), keepdim=True)
    span = heatmaps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (heatmaps - low) / span.clamp_min(1e-12), 0.0)


def model_gradcam(
    model: ExportedModel, images: np.ndarray, class_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``N x S x S`` of an exported model on uint8 images, and the class explained.

    The class is ``class_index`` for every image, else each image's predicted class
    (of the averaged probabilities, so every member of an ensemble explains the
    same class). Members' heatmaps are averaged and scaled to [0, 1] again.
    """
    if class_index is None:
        targets = model.predict_proba(images).argmax(axis=1)
    else:
        targets = np.full(len(images), class_index)
    heatmaps = np.mean([gradcam(member, images, targets) for member in model.members], axis=0)
    return _scale_to_unit(torch.from_numpy(heatmaps)).numpy(), targets


def overlay_heatmap(gray: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The gray image (``H x W`` uint8) in colour with the heatmap's colour map blended over it.

    The heatmap is stretched to the image's size, as ``resize`` squashed the image.
    Returns ``H x W x 3`` uint8.
    """
    import matplotlib

    stretched = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None],
        size=gray.shape,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    # As bytes and float32: a full-size X-ray has millions of pixels.
    colours = matplotlib.colormaps[COLORMAP](stretched, bytes=True)[..., :3].astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * gray[..., None].astype(np.float32) + OVERLAY_ALPHA * colours
    return np.asarray(np.round(blended), dtype=np.uint8)


def write_gradcam_overlays(
    model: ExportedModel,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    class_name: str | None = None,
) -> list[Path]:
    """Write ``<stem>_gradcam.png`` into ``out_dir`` for each image file; return their paths.

    Each image is decoded as training decoded it and explained for its predicted
    class, or for ``class_name`` (the positive class explains the COVID call). The
    overlay has the file's own resolution. Two files with one stem get
    ``<stem>_2_gradcam.png`` and so on; a file of the same name already in ``out_dir``
    is replaced. The list follows ``paths``. An unreadable file raises
    (``predict_paths`` reports those; pass the paths it could read).
    """
    class_index = None
    if class_name is not None:
        if class_name not in model.class_names:
            raise ValueError(f"unknown class {class_name!r}; classes: {list(model.class_names)}")
        class_index = model.class_names.index(class_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in map(Path, paths):
        gray = read_gray(path)[0]
        image = resize(gray, model.image_size)[np.newaxis, np.newaxis]
        heatmaps, _ = model_gradcam(model, image, class_index)
        overlay = overlay_heatmap(np.asarray(gray, dtype=np.uint8), heatmaps[0])
        target = out_dir / _free_name(path.stem, written)
        Image.fromarray(overlay).save(target)
        written.append(target)
    return written


def _free_name(stem: str, taken: list[Path]) -> str:
    names = {path.name for path in taken}
    name, copy = f"{stem}_gradcam.png", 1
    while name in names:
        copy += 1
        name = f"{stem}_{copy}_gradcam.png"
    return name
