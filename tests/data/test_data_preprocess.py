"""The torch-free preprocessing (Pillow + numpy) against the torchvision pipeline that built every index."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from retrieval.data.preprocess import PreprocessConfig, preprocess_array, to_uint8_chw
from retrieval.data.transforms import build_transforms


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("resize", ["squash", "center_crop"])
@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize(("width", "height"), [(37, 53), (53, 37), (200, 120), (64, 64), (31, 32), (641, 479)])
def test_numpy_pipeline_reproduces_torchvision(resize, size, width, height):
    image = _image(width, height, seed=width * height + size)
    pre = PreprocessConfig(input_size=size, resize=resize)
    expected = build_transforms(pre, train=False)(image).numpy()
    got = preprocess_array(image, pre)
    assert got.shape == expected.shape == (3, size, size) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5  # the same uint8 pixels; float rounding only


def test_grey_and_rgba_images_become_rgb_like_torchvision():
    pre = PreprocessConfig(input_size=32)
    for mode in ("L", "RGBA", "P"):
        image = _image(40, 30, seed=1).convert(mode)
        expected = build_transforms(pre, train=False)(image).numpy()
        assert np.abs(preprocess_array(image, pre) - expected).max() < 1e-5
        assert to_uint8_chw(image, pre).dtype == np.uint8


@pytest.mark.parametrize(("width", "height", "size"), [(2000, 10, 32), (10, 2000, 32), (200, 3000, 224)])
def test_elongated_images_crop_before_resizing_and_stay_within_one_level(width, height, size):
    image = _image(width, height, seed=7)
    pre = PreprocessConfig(input_size=size, resize="center_crop")
    expected = build_transforms(pre, train=False)(image).numpy()
    levels = np.abs(preprocess_array(image, pre) - expected) * np.array(pre.std).reshape(3, 1, 1) * 255
    assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.5


def test_a_20000_by_1_upload_is_not_blown_up_to_millions_of_pixels():
    pre = PreprocessConfig(input_size=224, resize="center_crop")
    start = time.perf_counter()
    pixels = to_uint8_chw(Image.new("RGB", (20000, 1), (10, 200, 30)), pre)
    assert pixels.shape == (3, 224, 224) and (pixels[:, 100, 100] == [10, 200, 30]).all()
    assert time.perf_counter() - start < 1.0  # the full resize would build a 4,480,000 x 224 image (3 GB) first
