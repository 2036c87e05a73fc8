"""Multi-scale, aspect-preserving extraction against a per-image reference written from the definition."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from indexing.multiscale import DEFAULT_SCALES, capped_size, extract_multiscale, scaled_size
from models import Encoder
from retrieval.data.datasets import CsvImageDataset, InMemoryImageDataset
from retrieval.data.labels import LabelSchema, LabelVocabulary

MAX_SIDE = 64
CORRUPT = 3  # dataset position of the unreadable file
#: (width, height) per dataset position: landscape and portrait, several sizes, two above MAX_SIDE.
SIZES = {0: (64, 48), 1: (48, 64), 2: (60, 46), 4: (46, 62), 5: (120, 90), 6: (50, 66), 7: (66, 50)}


def _smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-frequency colour noise: resizing it changes little, as with photos."""
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def encoder(tiny_encoder_config) -> Encoder:
    torch.manual_seed(0)
    return Encoder(tiny_encoder_config).eval()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> CsvImageDataset:
    """Seven PNGs of different shapes and one file that is not an image, listed in a CSV."""
    root = tmp_path_factory.mktemp("multiscale")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        name = f"img_{i}.png"
        if i == CORRUPT:
            (root / name).write_bytes(b"not a PNG at all")
        else:
            _smooth_image(rng, *SIZES[i]).save(root / name)
        rows.append({"path": name, "fine": f"c{i % 2}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine"])
        writer.writeheader()
        writer.writerows(rows)
    return CsvImageDataset(root / "labels.csv")


def _reference(encoder: Encoder, image: Image.Image, max_side: int, scales=DEFAULT_SCALES) -> np.ndarray:
    """The definition, one image at a time: cap the long side, resize by each scale, embed, average, normalise."""
    width, height = image.size
    if max(width, height) > max_side:
        ratio = max_side / max(width, height)
        width, height = round(width * ratio), round(height * ratio)
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor(encoder.config.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.config.preprocess.std).view(1, 3, 1, 1)
    descriptors = []
    with torch.no_grad():
        for s in scales:
            size = (max(32, round(height * s)), max(32, round(width * s)))
            resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
            descriptors.append(encoder((resized - mean) / std)[0])
    return F.normalize(torch.stack(descriptors).mean(dim=0), dim=0).numpy()


@pytest.fixture(scope="module")
def per_image(encoder, gallery):
    return extract_multiscale(encoder, gallery, max_side=MAX_SIDE, batch_size=1, progress=False)


def test_sizes_keep_the_aspect_ratio_and_are_never_enlarged_to_the_cap():
    assert capped_size(120, 90, 64) == (64, 48)
    assert capped_size(90, 120, 64) == (48, 64)
    assert capped_size(40, 30, 64) == (40, 30)  # smaller than the cap: left alone
    assert capped_size(1000, 3, 64) == (64, 1)
    assert scaled_size(64, 48, math.sqrt(2)) == (91, 68)
    assert scaled_size(64, 48, 1 / math.sqrt(2)) == (45, 34)
    assert scaled_size(40, 30, 0.5) == (32, 32)  # each side clamped to the minimum
    assert scaled_size(1000, 10, 1.0, min_side=16) == (1000, 16)


def test_batch_of_one_equals_the_per_image_definition(encoder, gallery, per_image):
    kept = [i for i in range(8) if i != CORRUPT]
    assert per_image.indices.tolist() == kept and per_image.indices.dtype == np.int64
    assert per_image.embeddings.shape == (7, 32) and per_image.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(per_image.embeddings, axis=1), 1.0, atol=1e-5)
    expected = np.stack([_reference(encoder, gallery.load_image(i), MAX_SIDE) for i in kept])
    np.testing.assert_allclose(per_image.embeddings, expected, atol=1e-5)


def test_corrupt_file_is_skipped_and_reported_and_indices_map_back(encoder, gallery, per_image):
    batched = extract_multiscale(encoder, gallery, max_side=MAX_SIDE, batch_size=3, progress=True)
    for out in (per_image, batched):
        assert out.indices.tolist() == [0, 1, 2, 4, 5, 6, 7]  # dataset positions, increasing
        assert len(out.skipped) == 1
        path, reason = out.skipped.skipped[0]
        assert path == gallery.names[CORRUPT] and "not a recognised image" in reason
    # Batches sort by aspect ratio ([4, 1, 6], [2, 0, 5], [7]) and resize to the median image's size:
    # close to, not equal to, the per-image descriptors.
    cosine = (batched.embeddings * per_image.embeddings).sum(axis=1)
    assert cosine.min() > 0.99, cosine


def test_batches_of_one_shape_are_exact(encoder):
    rng = np.random.default_rng(1)
    images = [_smooth_image(rng, 56, 40) for _ in range(4)]
    schema = LabelSchema(("fine",))
    dataset = InMemoryImageDataset(images, np.zeros((4, 1)), schema, LabelVocabulary(schema, [["a"]]), list("abcd"))
    single = extract_multiscale(encoder, dataset, scales=(0.8, 1.0), max_side=MAX_SIDE, batch_size=1, progress=False)
    batched = extract_multiscale(encoder, dataset, scales=(0.8, 1.0), max_side=MAX_SIDE, batch_size=4, progress=False)
    np.testing.assert_allclose(batched.embeddings, single.embeddings, atol=1e-5)


def test_long_side_cap_is_applied_before_scaling(encoder, gallery, per_image):
    large = gallery.subset([5, 0])  # 120 x 90 and 64 x 48
    uncapped = extract_multiscale(encoder, large, max_side=1024, batch_size=1, progress=False)
    expected = np.stack([_reference(encoder, large.load_image(i), 1024) for i in range(2)])
    np.testing.assert_allclose(uncapped.embeddings, expected, atol=1e-5)
    # Under the 64 px cap the 120 x 90 image is embedded from 64 x 48 pixels; without it, from 120 x 90.
    assert not np.allclose(uncapped.embeddings[0], per_image.embeddings[4], atol=1e-3)
    np.testing.assert_allclose(uncapped.embeddings[1], per_image.embeddings[0], atol=1e-6)  # already small


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, 0.0)}, "scales"),
        ({"max_side": 0}, "max_side"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_arguments_fail_clearly(encoder, gallery, kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_multiscale(encoder, gallery, progress=False, **kwargs)
