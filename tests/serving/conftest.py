"""Fixtures for the serving tests: a tiny gallery on disk, its index and an ONNX export, built once."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
MIDDLE = {"red": "warm", "green": "cool", "blue": "cool"}
GALLERY_SIZE = 9


@pytest.fixture(scope="session")
def serving_gallery(tmp_path_factory) -> Path:
    """Nine seeded PNGs (noisy colour patches with an inverted square) and their ``labels.csv`` (with a SKU column)."""
    root = tmp_path_factory.mktemp("serving_gallery")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(GALLERY_SIZE):
        fine = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[fine]) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        y, x = rng.integers(0, 24, 2)
        pixels[y : y + 16, x : x + 16] = 255 - pixels[y : y + 16, x : x + 16]
        name = f"img_{i}.png"
        Image.fromarray(pixels).save(root / name)
        rows.append({"path": name, "fine": fine, "middle": MIDDLE[fine], "coarse": "colour", "sku": f"SKU-{i:03d}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "middle", "coarse", "sku"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def serving_index(tiny_checkpoint, serving_gallery, tmp_path_factory) -> Path:
    """An exact index of the gallery built by the shared tiny checkpoint; the SKU column is per-item metadata."""
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery

    out = tmp_path_factory.mktemp("serving_index") / "index"
    build_index(tiny_checkpoint, open_gallery(serving_gallery), out, batch_size=4, progress=False)
    return out


@pytest.fixture(scope="session")
def serving_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX (the export itself checks parity at two sizes)."""
    from serving.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("serving_onnx") / "encoder.onnx").path


@pytest.fixture(scope="session")
def other_checkpoint(make_checkpoint) -> Path:
    """Same architecture as the tiny checkpoint, different random weights (so a different encoder id)."""
    return make_checkpoint(1)


@pytest.fixture(scope="session")
def calibrated_index(serving_index, serving_gallery, tmp_path_factory) -> Path:
    """A copy of the serving index calibrated on its own gallery (the original stays uncalibrated)."""
    import shutil

    from indexing.calibrate_index import calibrate_index

    out = tmp_path_factory.mktemp("calibrated_index") / "index"
    shutil.copytree(serving_index, out)
    calibrate_index(out, serving_gallery, batch_size=4, progress=False)
    return out
