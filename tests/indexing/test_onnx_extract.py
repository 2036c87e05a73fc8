"""Gallery extraction through ONNX Runtime: parity with PyTorch, the cached export, resuming, the runtime choice.

A real tiny encoder (ResNet10-T at 32 px) is exported by ``indexing.onnx_cache`` and run in a real ONNX Runtime
session over real image files written here (one of them broken); every comparison is against the same images
embedded by PyTorch through the same extraction code.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from interrupted_gallery import InterruptedGallery
from PIL import Image

from indexing.embedding_store import SPEC_FILE, EmbeddingStore, ExtractionMismatchError, combine_stores
from indexing.extract import extract_embeddings
from indexing.extract_job import AUTO_ONNX_MIN_IMAGES, ExtractOptions, choose_runtime, extract_gallery
from indexing.onnx_cache import GALLERY_ONNX, GALLERY_ONNX_RECORD, OnnxExtractionError, gallery_onnx
from indexing.onnx_embedder import OnnxGalleryEncoder, normalise_batch, prefetched
from models import load_encoder
from models.onnx_export import PARITY_THRESHOLD
from retrieval.config import ConfigError
from retrieval.data.gallery import Gallery, open_gallery
from retrieval.data.preprocess import PreprocessConfig, normalise_array

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BROKEN = 6  # gallery position of the truncated file
OPTIONS = {"batch_size": 4, "chunk_size": 8, "progress": False}


def _write_images(root: Path, count: int) -> Path:
    """``count`` JPEGs of assorted sizes (odd aspect ratios, a greyscale one) and one truncated file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L") if i == 3 else Image.fromarray(pixels)
        image.save(root / f"img_{i:03d}.jpg", quality=90)
    data = (root / f"img_{BROKEN:03d}.jpg").read_bytes()
    (root / f"img_{BROKEN:03d}.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Gallery:
    return open_gallery(_write_images(tmp_path_factory.mktemp("photos"), 22))


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return load_encoder(tiny_checkpoint)


@pytest.fixture(scope="module")
def onnx_run(encoder, tiny_checkpoint, gallery, tmp_path_factory):
    """An onnx extraction interrupted (Ctrl-C at position 13, in chunk 1) and then resumed under ``auto``."""
    work = tmp_path_factory.mktemp("onnx") / "work"
    with pytest.raises(KeyboardInterrupt):
        extract_gallery(encoder, tiny_checkpoint, InterruptedGallery(gallery, 13), work,
                        ExtractOptions(**OPTIONS, runtime="onnx"))  # fmt: skip
    finished = EmbeddingStore.open(work).finished_chunks()
    export_mtime = (work / GALLERY_ONNX).stat().st_mtime_ns
    store, run = extract_gallery(encoder, tiny_checkpoint, gallery, work, ExtractOptions(**OPTIONS, runtime="auto"))
    return {"work": work, "store": store, "run": run, "finished": finished, "export_mtime": export_mtime}


@pytest.fixture(scope="module")
def torch_run(encoder, tiny_checkpoint, gallery, tmp_path_factory):
    work = tmp_path_factory.mktemp("torch") / "work"
    return extract_gallery(encoder, tiny_checkpoint, gallery, work, ExtractOptions(**OPTIONS, runtime="torch"))


def test_onnx_extraction_matches_pytorch_on_real_files(onnx_run, torch_run):
    work, store, run = onnx_run["work"], onnx_run["store"], onnx_run["run"]
    assert run.runtime == "onnx" and store.is_complete()
    assert store.spec.runtime == "onnx" and json.loads((work / SPEC_FILE).read_text())["runtime"] == "onnx"
    onnx_vectors, torch_vectors = combine_stores([store]), combine_stores([torch_run[0]])
    assert onnx_vectors.positions.tolist() == torch_vectors.positions.tolist()
    assert BROKEN not in onnx_vectors.positions.tolist() and len(onnx_vectors.skipped) == 1
    assert onnx_vectors.rows == torch_vectors.rows
    norms = np.linalg.norm(onnx_vectors.embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    cosines = (onnx_vectors.embeddings * torch_vectors.embeddings).sum(axis=1)
    assert cosines.min() >= PARITY_THRESHOLD
    assert not np.array_equal(onnx_vectors.embeddings, torch_vectors.embeddings)  # two runtimes really ran


def test_the_export_is_recorded_and_reused_while_intact(onnx_run, encoder):
    work = onnx_run["work"]
    record = json.loads((work / GALLERY_ONNX_RECORD).read_text())
    assert record["encoder_id"] == encoder.encoder_id and record["min_cosine"] >= PARITY_THRESHOLD
    reused = gallery_onnx(encoder, work)
    assert reused.reused and reused.sha256 == record["sha256"]


def test_a_damaged_export_is_made_again(onnx_run, encoder, tmp_path):
    for name in (GALLERY_ONNX, GALLERY_ONNX_RECORD):
        shutil.copy(onnx_run["work"] / name, tmp_path / name)
    original = gallery_onnx(encoder, tmp_path)
    assert original.reused
    data = bytearray(original.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    original.path.write_bytes(bytes(data))
    again = gallery_onnx(encoder, tmp_path)
    assert not again.reused and again.sha256 == original.sha256  # exported again, and the export is deterministic
    assert not list(tmp_path.glob(f".{GALLERY_ONNX}.tmp-*"))


def test_an_interrupted_onnx_extraction_resumes_to_the_vectors_of_one_run(onnx_run, encoder, gallery):
    run = onnx_run["run"]
    assert onnx_run["finished"] == [0]  # positions 0-7; chunk 1 was in progress when Ctrl-C came
    assert "continuing" in run.runtime_reason  # auto keeps the runtime it found
    assert run.chunks_before == 1 and run.chunks_written == 2
    assert (onnx_run["work"] / GALLERY_ONNX).stat().st_mtime_ns == onnx_run["export_mtime"]  # reused
    resumed = combine_stores([onnx_run["store"]])
    embedder = OnnxGalleryEncoder(
        onnx_run["work"] / GALLERY_ONNX, encoder.encoder_id, encoder.embedding_dim, encoder.config.preprocess
    )
    one_run = extract_embeddings(encoder, gallery, batch_size=4, progress=False, embedder=embedder)
    assert resumed.positions.tolist() == one_run.indices.tolist() and len(resumed.skipped) == 1
    np.testing.assert_allclose(resumed.embeddings, one_run.embeddings, rtol=0, atol=1e-6)


def test_resuming_with_the_other_runtime_is_refused(encoder, tiny_checkpoint, gallery, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        extract_gallery(encoder, tiny_checkpoint, InterruptedGallery(gallery, 10), work,
                        ExtractOptions(**OPTIONS, runtime="torch"))  # fmt: skip
    with pytest.raises(ExtractionMismatchError, match=r"runtime: torch vs onnx.*--runtime torch.*--restart"):
        extract_gallery(encoder, tiny_checkpoint, gallery, work, ExtractOptions(**OPTIONS, runtime="onnx"))
    assert EmbeddingStore.open(work).finished_chunks() == [0]  # nothing was discarded


def test_onnx_session_honours_the_thread_setting(onnx_run, encoder, monkeypatch):
    path = onnx_run["work"] / GALLERY_ONNX
    monkeypatch.setenv("RETRIEVAL_THREADS", "1")
    one = OnnxGalleryEncoder(path, encoder.encoder_id, encoder.embedding_dim, encoder.config.preprocess)
    assert one.threads == 1 and one.session.get_session_options().intra_op_num_threads == 1
    two = OnnxGalleryEncoder(path, encoder.encoder_id, encoder.embedding_dim, encoder.config.preprocess, threads=2)
    assert two.session.get_session_options().intra_op_num_threads == 2


def test_in_memory_extraction_through_onnx_with_workers(onnx_run, encoder, gallery):
    """``extract_embeddings`` with the ONNX embedder and a DataLoader worker process decoding."""
    path = onnx_run["work"] / GALLERY_ONNX
    embedder = OnnxGalleryEncoder(path, encoder.encoder_id, encoder.embedding_dim, encoder.config.preprocess)
    with_worker = extract_embeddings(encoder, gallery, batch_size=5, num_workers=1, progress=False, embedder=embedder)
    reference = extract_embeddings(encoder, gallery, batch_size=5, progress=False)
    assert with_worker.indices.tolist() == reference.indices.tolist() and len(with_worker.skipped) == 1
    assert (with_worker.embeddings * reference.embeddings).sum(axis=1).min() >= PARITY_THRESHOLD


def test_batch_normalisation_is_the_per_image_arithmetic_bit_for_bit():
    pre = PreprocessConfig(input_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = np.random.default_rng(1).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    assert np.array_equal(normalise_batch(pixels, pre), normalise_array(pixels, pre))


def test_prefetched_keeps_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetched(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_prefetched_stops_its_thread_when_the_consumer_stops():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    count = len(produced)
    assert count <= 3 + 2 + 1  # at most the queue's depth (and the item in hand) beyond what was consumed
    time.sleep(0.3)
    assert len(produced) == count


@pytest.mark.parametrize(
    ("requested", "device", "images", "previous", "expected"),
    [
        ("torch", "cpu", 10_000, None, "torch"),
        ("onnx", "cpu", 3, None, "onnx"),
        ("auto", "cpu", AUTO_ONNX_MIN_IMAGES, None, "onnx"),
        ("auto", "cpu", AUTO_ONNX_MIN_IMAGES - 1, None, "torch"),
        ("auto", "cpu", 3, "onnx", "onnx"),
        ("auto", "cpu", 10_000, "torch", "torch"),
    ],
)
def test_choose_runtime(requested, device, images, previous, expected):
    choice = choose_runtime(requested, device, images, previous)
    assert choice.runtime == expected and choice.reason
    assert choice.fallback == (requested == "auto" and previous is None and expected == "onnx")


def test_choose_runtime_refuses_unknown_names_and_auto_uses_torch_on_a_gpu():
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; valid: auto, torch, onnx"):
        choose_runtime("tensorrt", "cpu", 10)
    with pytest.raises(ConfigError, match="runtime"):
        ExtractOptions(runtime="tensorrt")  # type: ignore[arg-type]
    if torch.cuda.is_available():
        assert choose_runtime("auto", "cuda", 10_000).runtime == "torch"
        with pytest.raises(ConfigError, match="--runtime onnx runs ONNX Runtime on the CPU"):
            choose_runtime("onnx", "cuda", 10)


def test_missing_onnxruntime_is_a_clear_error_and_auto_uses_torch(encoder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(OnnxExtractionError, match=r"onnxruntime not installed.*--runtime torch"):
        gallery_onnx(encoder, tmp_path)
    choice = choose_runtime("auto", "cpu", 10_000)
    assert choice.runtime == "torch" and "onnxruntime not installed" in choice.reason


class _Histogram(torch.nn.Module):
    """A pooling ONNX has no operator for (``aten::histc``): what an unexportable encoder looks like."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled + torch.stack([torch.histc(row, bins=pooled.shape[1]) for row in pooled])


def test_an_unexportable_encoder_names_the_torch_runtime(tiny_checkpoint, gallery, tmp_path, caplog):
    encoder = load_encoder(tiny_checkpoint)
    encoder.pooling = _Histogram()
    with pytest.raises(OnnxExtractionError, match=r"cannot run in ONNX Runtime: .*histc.*--runtime torch"):
        extract_gallery(encoder, tiny_checkpoint, gallery, tmp_path / "w", ExtractOptions(**OPTIONS, runtime="onnx"))
    assert not (tmp_path / "w" / GALLERY_ONNX).exists() and not list((tmp_path / "w").glob(".*tmp*"))


@pytest.mark.slow
def test_auto_falls_back_to_torch_for_an_unexportable_encoder(tiny_checkpoint, tmp_path, caplog):
    encoder = load_encoder(tiny_checkpoint)
    encoder.pooling = _Histogram()
    many = open_gallery(_write_images(tmp_path / "many", AUTO_ONNX_MIN_IMAGES))
    options = ExtractOptions(batch_size=32, chunk_size=64, progress=False, runtime="auto")
    with caplog.at_level(logging.WARNING):
        store, run = extract_gallery(encoder, tiny_checkpoint, many, tmp_path / "w", options)
    assert run.runtime == "torch" and "does not run in ONNX Runtime" in run.runtime_reason
    assert store.spec.runtime == "torch" and store.is_complete() and "falling back to PyTorch" in caplog.text
