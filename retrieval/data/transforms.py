"""Preprocessing shared by training, indexing and serving: PIL image in, normalised float tensor out.

The evaluation pipeline is fully described by :class:`PreprocessConfig`, which is saved inside every
encoder checkpoint so that the gallery and the queries are always preprocessed the same way. The
training pipeline adds light augmentation on top; its strength lives in :class:`AugmentConfig`, which
belongs to the training recipe rather than to the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, field_validator
from torchvision.transforms import v2

from retrieval.config import StrictModel

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "PreprocessConfig",
    "augment_steps",
    "build_transforms",
    "normalise_steps",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image], torch.Tensor]


class PreprocessConfig(StrictModel):
    """How an image becomes a model input; travels with the encoder weights.

    Attributes:
        input_size: side of the square model input in pixels.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided after subtracting the mean.
        resize: ``"squash"`` resizes to ``input_size`` x ``input_size`` ignoring the aspect ratio (keeps the
            whole object in view); ``"center_crop"`` resizes the shorter side and crops the centre (keeps the
            aspect ratio, may cut the edges).
    """

    input_size: int = Field(224, ge=8, le=4096)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: Literal["squash", "center_crop"] = "squash"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in value):
            raise ValueError(f"std values must be positive, got {value}")
        return value


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
