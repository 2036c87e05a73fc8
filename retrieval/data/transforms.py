"""Preprocessing shared by training, indexing and serving: PIL image in, normalised float tensor out.

The evaluation pipeline is fully described by :class:`PreprocessConfig` (``retrieval.data.preprocess``, re-exported
here), which is saved inside every encoder checkpoint so that the gallery and the queries are always preprocessed the
same way; ``retrieval.data.preprocess`` also implements it without torch, pixel for pixel. The
training pipeline adds light augmentation on top; its strength lives in :class:`AugmentConfig`, which
belongs to the training recipe rather than to the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from pydantic import Field
from torchvision.transforms import v2

from retrieval.config import StrictModel
from retrieval.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "PreprocessConfig",
    "augment_steps",
    "build_transforms",
    "normalise_steps",
]

ImageTransform = Callable[[Image.Image], torch.Tensor]


class AugmentConfig(StrictModel):
    """Strength of the training-time augmentation.

    The defaults are deliberately light: in the synthetic hierarchical dataset, colour and texture are
    what separate fine classes, so hue jitter stays tiny and crops keep most of the object.

    Attributes:
        scale_min: smallest crop area, as a fraction of the image, for the random resized crop.
        ratio: aspect-ratio range of the random resized crop.
        hflip: flip horizontally with probability 0.5.
        brightness: ColorJitter brightness (0 disables).
        contrast: ColorJitter contrast (0 disables).
        saturation: ColorJitter saturation (0 disables).
        hue: ColorJitter hue, in fractions of the colour wheel (0 disables; keep <= 0.03 for colour classes).
    """

    scale_min: float = Field(0.6, gt=0.0, le=1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.1, ge=0.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)


class _ToRGB(v2.Transform):
    """Convert palette, greyscale or RGBA PIL images to RGB so every input has three channels."""

    def transform(self, inpt, params):  # torchvision hook: called once per input
        if isinstance(inpt, Image.Image) and inpt.mode != "RGB":
            return inpt.convert("RGB")
        return inpt


def _resize_steps(pre: PreprocessConfig) -> list[v2.Transform]:
    size = pre.input_size
    if pre.resize == "squash":
        return [v2.Resize((size, size), antialias=True)]
    return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]


def augment_steps(
    aug: AugmentConfig, size: int | tuple[int, int], ratio: tuple[float, float] | None = None
) -> list[v2.Transform]:
    """The random geometry and colour of training: a resized crop to ``size``, flip, colour jitter.

    Args:
        aug: augmentation strength.
        size: output side (square) or ``(height, width)``.
        ratio: crop-box aspect-ratio range; default ``aug.ratio`` (around a square).
    """
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=(aug.scale_min, 1.0), ratio=ratio or aug.ratio, antialias=True)
    ]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if any((aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        steps.append(
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue)
        )
    return steps


def normalise_steps(pre: PreprocessConfig) -> list[v2.Transform]:
    """PIL image -> float32 tensor in [0, 1] -> normalised with the encoder's mean and std."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]


def build_transforms(pre: PreprocessConfig, train: bool, augment: AugmentConfig | None = None) -> ImageTransform:
    """Build the image pipeline ``PIL.Image -> float32 tensor (3, input_size, input_size)``.

    Args:
        pre: the encoder's preprocessing (size, normalisation, resize policy).
        train: add random augmentation (crop, flip, mild colour jitter); evaluation, indexing and serving
            use ``train=False`` so that identical images always give identical tensors.
        augment: augmentation strength for ``train=True``; defaults to :class:`AugmentConfig()`. Ignored
            when ``train`` is False.

    Returns:
        A picklable callable (safe for DataLoader workers).
    """
    geometry = augment_steps(augment or AugmentConfig(), pre.input_size) if train else _resize_steps(pre)
    return v2.Compose([_ToRGB(), *geometry, *normalise_steps(pre)])
