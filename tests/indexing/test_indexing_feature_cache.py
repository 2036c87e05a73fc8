"""Cached multi-scale features: file names, shape checks, model loaded only on a miss, incomplete sets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import indexing.multiscale
import models
from indexing.feature_cache import (
    CACHE_FORMAT,
    FeatureCache,
    FeatureKey,
    MultiscaleFeatures,
    file_fingerprint,
    names_fingerprint,
)
from models import read_checkpoint_info
from retrieval.data.datasets import ImageFolderDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = FeatureKey("roxford5k", "db", "abc123", "f00d", (0.7071, 1.0), 64)


def test_key_names_everything_that_determines_the_content(tmp_path):
    assert KEY.filename == f"roxford5k-db-encabc123-f00d-s0.7071_1-max64-{CACHE_FORMAT}.npy"
    assert names_fingerprint(["a", "b"]) != names_fingerprint(["b", "a"]) and len(names_fingerprint([])) == 12
    (tmp_path / "f").write_bytes(b"x")
    assert len(file_fingerprint(tmp_path / "f")) == 12


def test_cache_round_trip_and_misfits_are_misses(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    assert cache.load(KEY, 4) is None  # nothing yet
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = cache.save(KEY, array)
    assert path == tmp_path / "cache" / KEY.filename
    loaded = cache.load(KEY, 4, rows=3)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array)
    assert cache.load(KEY, 5) is None and cache.load(KEY, 4, rows=2) is None  # wrong dimension / rows
    path.write_bytes(b"garbage")
    assert cache.load(KEY, 4) is None
    np.save(path, np.array([object()], dtype=object), allow_pickle=True)
    assert cache.load(KEY, 4) is None  # never unpickled


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four small images and one file that is not an image."""
    root = tmp_path_factory.mktemp("feature_cache")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30 + 2 * i, 40, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    (root / "img_9.png").write_bytes(b"not a png")
    return root


def _counting(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = indexing.multiscale.extract_multiscale

    def counting(encoder, dataset, *args, **kwargs):
        sizes.append(len(dataset))
        return original(encoder, dataset, *args, **kwargs)

    monkeypatch.setattr(indexing.multiscale, "extract_multiscale", counting)
    return sizes


def test_a_second_run_reads_the_cache_without_loading_the_model(folder, tiny_checkpoint, tmp_path, monkeypatch):
    sizes = _counting(monkeypatch)
    info = read_checkpoint_info(tiny_checkpoint)
    readable = ImageFolderDataset(folder).subset([0, 1, 2, 3])
    run = MultiscaleFeatures((1.0,), 64, batch_size=2, progress=False, cache=FeatureCache(tmp_path))
    key = run.key("mini", "db", info.encoder_id, names_fingerprint(readable.names))
    first = run.features(tiny_checkpoint, readable, key, info.config.embedding_dim)
    assert first.written == key.filename and first.loaded is None and first.num_skipped == 0
    assert first.embeddings.shape == (4, 32) and sizes == [4]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the features were cached")

    monkeypatch.setattr(models, "load_encoder", no_model)
    again = MultiscaleFeatures((1.0,), 64, progress=False, cache=FeatureCache(tmp_path))
    second = again.features(tiny_checkpoint, readable, key, info.config.embedding_dim)
    assert second.loaded == key.filename and second.written is None and sizes == [4]
    np.testing.assert_array_equal(second.embeddings, first.embeddings)


def test_unreadable_images_complete_sets_are_not_cached_others_are(folder, tiny_checkpoint, tmp_path, monkeypatch):
    sizes = _counting(monkeypatch)
    info = read_checkpoint_info(tiny_checkpoint)
    dataset = ImageFolderDataset(folder)  # five files, one unreadable
    run = MultiscaleFeatures((1.0,), 64, progress=False, cache=FeatureCache(tmp_path))
    key = run.key("mini", "distractors", info.encoder_id, names_fingerprint(dataset.names))
    complete = run.features(tiny_checkpoint, dataset, key, 32, complete=True)
    assert complete.num_skipped == 1 and "img_9.png" in complete.skipped.skipped[0][0]
    assert complete.written is None and not list(tmp_path.iterdir())  # rows would not match positions
    partial = run.features(tiny_checkpoint, dataset, key, 32, complete=False)
    assert partial.written == key.filename and partial.embeddings.shape == (4, 32) and partial.num_skipped == 1
    hit = run.features(tiny_checkpoint, dataset, key, 32, complete=False)
    assert hit.loaded == key.filename and hit.num_skipped == 1 and sizes == [5, 5]
    assert run.features(tiny_checkpoint, dataset, key, 32, complete=True).loaded is None  # 4 rows for 5 items
    without_cache = MultiscaleFeatures((1.0,), 64, progress=False)
    assert without_cache.features(tiny_checkpoint, dataset, key, 32, complete=False).written is None
