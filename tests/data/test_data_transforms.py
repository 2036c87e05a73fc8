"""Preprocessing: output shape, dtype and exact normalisation; resize policies; mild train augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import ConfigError, load_config
from retrieval.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, PreprocessConfig, build_transforms


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, rgb).convert(mode)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("resize", ["squash", "center_crop"])
def test_output_shape_and_dtype(train: bool, resize: str) -> None:
    pre = PreprocessConfig(input_size=32, resize=resize)
    out = build_transforms(pre, train=train)(_solid((10, 200, 30), size=(57, 23)))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32


def test_eval_normalisation_is_exact() -> None:
    rgb = (200, 100, 50)
    out = build_transforms(PreprocessConfig(input_size=16), train=False)(_solid(rgb))
    expected = (np.array(rgb) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    assert float(out.std(dim=(1, 2)).max()) < 1e-5  # a flat image stays flat


def test_custom_mean_std() -> None:
    pre = PreprocessConfig(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = build_transforms(pre, train=False)(_solid((255, 0, 255)))
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [1.0, -1.0, 1.0], atol=1e-6)


def test_non_rgb_inputs_become_three_channels() -> None:
    t = build_transforms(PreprocessConfig(input_size=8), train=False)
    for mode in ("L", "RGBA", "P"):
        assert t(_solid((90, 90, 90), mode=mode)).shape == (3, 8, 8)


def test_center_crop_cuts_the_sides_and_squash_keeps_them() -> None:
    arr = np.full((20, 60, 3), 255, dtype=np.uint8)
    arr[:, :10] = 0  # a black band at the far left, outside the central 20x20 square
    image = Image.fromarray(arr)
    crop = build_transforms(PreprocessConfig(input_size=20, resize="center_crop", mean=(0, 0, 0), std=(1, 1, 1)), False)
    squash = build_transforms(PreprocessConfig(input_size=20, resize="squash", mean=(0, 0, 0), std=(1, 1, 1)), False)
    assert float(crop(image).min()) > 0.99
    assert float(squash(image)[:, :, 0].max()) < 0.01


def test_train_augmentation_is_seeded_and_keeps_colour_identity() -> None:
    t = build_transforms(PreprocessConfig(input_size=24, mean=(0, 0, 0), std=(1, 1, 1)), train=True)
    red = _solid((200, 40, 40), size=(48, 48))
    torch.manual_seed(3)
    a = t(red)
    torch.manual_seed(3)
    assert torch.equal(a, t(red))
    for _ in range(20):
        r, g, b = t(red).mean(dim=(1, 2)).tolist()
        assert r > g + 0.3 and r > b + 0.3  # small hue jitter: red stays red


def test_train_without_augmentation_only_crops() -> None:
    aug = AugmentConfig(scale_min=1.0, ratio=(1.0, 1.0), hflip=False, brightness=0, contrast=0, saturation=0, hue=0)
    pre = PreprocessConfig(input_size=16)
    image = _solid((12, 34, 56), size=(16, 16))
    assert torch.allclose(build_transforms(pre, True, aug)(image), build_transforms(pre, False)(image), atol=1e-6)


def test_transforms_pickle_for_worker_processes() -> None:
    t = build_transforms(PreprocessConfig(input_size=8), train=True)
    assert pickle.loads(pickle.dumps(t))(_solid((1, 2, 3))).shape == (3, 8, 8)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="resize"):
        load_config(PreprocessConfig, overrides=["resize=stretch"])
    with pytest.raises(ConfigError, match="std"):
        load_config(PreprocessConfig, overrides=["std=[0.2,0,0.2]"])
    assert load_config(PreprocessConfig, overrides=["input_size=64"]).input_size == 64
