"""The evaluation preprocessing as data plus a torch-free implementation (Pillow + numpy).

``PreprocessConfig`` travels inside every checkpoint and every exported model, so the gallery
and the queries are always prepared alike. The torch pipeline (``retrieval.data.transforms``)
and the functions here are two implementations of the same steps, kept pixel-identical by a
test: a serving process with an ONNX model, a phone app and the reference client prepare a
query with Pillow and numpy alone, without importing torch (an import that costs seconds).

The steps: convert to RGB; resize with Pillow's bilinear filter (antialiased), either squashing to
``input_size`` x ``input_size`` or resizing the shorter side to ``input_size`` and cropping the
centre; scale to [0, 1]; subtract ``mean``; divide by ``std``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from retrieval.config import StrictModel

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessConfig",
    "normalise_array",
    "preprocess_array",
    "resize_for_model",
    "to_uint8_chw",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: ``center_crop`` of an image whose resized long side exceeds this many crop sides resizes only the cropped
#: region: the pixels agree with the full resize to within rounding (tested), and memory stays O(size²).
MAX_CROP_STRETCH = 4


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


def resize_for_model(image: Image.Image, pre: PreprocessConfig) -> Image.Image:
    """The RGB image resized (and, for ``center_crop``, cropped) to ``input_size`` x ``input_size``.

    Matches torchvision's ``v2.Resize`` / ``v2.CenterCrop`` on PIL images: the same output size rule
    (the longer side becomes ``int(size * long / short)``), Pillow's bilinear filter, and the crop
    offset ``int(round((side - size) / 2))``.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = pre.input_size
    if pre.resize == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    top = round((new_height - size) / 2.0)
    left = round((new_width - size) / 2.0)
    if new_long > MAX_CROP_STRETCH * size:
        # A very elongated image (a 20000x1 upload) would be resized to millions of pixels only to keep the
        # centre: resize just the source region that lands in the crop (Pillow's ``box``), with the same scale.
        scale_x, scale_y = new_width / width, new_height / height
        box = (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y)
        return image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    return image.crop((left, top, left + size, top + size))


def to_uint8_chw(image: Image.Image, pre: PreprocessConfig) -> np.ndarray:
    """The resized image as a ``(3, input_size, input_size)`` uint8 array: the input of a mobile model."""
    pixels = np.asarray(resize_for_model(image, pre), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def normalise_array(pixels: np.ndarray, pre: PreprocessConfig) -> np.ndarray:
    """uint8 ``(..., 3, H, W)`` pixels -> float32 scaled to [0, 1], minus ``mean``, over ``std``."""
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return ((pixels.astype(np.float32) / np.float32(255.0)) - mean) / std


def preprocess_array(image: Image.Image, pre: PreprocessConfig) -> np.ndarray:
    """One image -> the normalised ``(3, input_size, input_size)`` float32 array a float model takes."""
    return normalise_array(to_uint8_chw(image, pre), pre)
