"""Extraction on Ray Data writes the extraction directory the local pipeline writes, and the same index follows.

A seeded tiny encoder embeds real PNG files (plus a truncated PNG, an empty file and a text file named .png,
two of them filling one whole batch) once locally and once through a Ray actor pool on this machine's cores;
chunks, skip reports, metadata, vectors and the indexes built from them are compared. One Ray session
(``ray.init(num_cpus=2)``) is shared by the module, and Ray extracts once in the default run: starting a
session takes seconds, starting the actors (torch and torchvision imports) more.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexing.builder import index_embeddings
from indexing.embedding_store import EmbeddingStore, ExtractionMismatchError, combine_stores
from indexing.extract_job import ExtractOptions, extract_gallery, extraction_spec
from indexing.index_dir import open_index_dir
from indexing.ray_extract import (
    RAY_INSTALL_HINT,
    RayUnavailableError,
    extract_gallery_ray,
    plan_workers,
)
from models.checkpoint import load_encoder
from retrieval.config import ConfigError
from retrieval.data.gallery import open_gallery
from retrieval.errors import UserFacingError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNT = 44
# Chunks of 8 cut into batches of 3: positions 6 and 7 are the whole last batch of chunk 0, so a batch with no
# readable image crosses the pipeline too; 20 is a text file with an image name.
TRUNCATED, EMPTY, NOT_AN_IMAGE = 6, 7, 20
OPTIONS = ExtractOptions(batch_size=3, chunk_size=8, progress=False)


def _write_gallery(root: Path) -> Path:
    rng = np.random.default_rng(7)
    rows = []
    for i in range(COUNT):
        name = f"img_{i:03d}.png"
        colour = np.array([(60 * i) % 256, (97 * i) % 256, (151 * i) % 256])
        pixels = np.clip(colour + rng.normal(0, 25, (20 + i % 5, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / name)
        if i == TRUNCATED:
            (root / name).write_bytes((root / name).read_bytes()[:60])
        elif i == EMPTY:
            (root / name).write_bytes(b"")
        elif i == NOT_AN_IMAGE:
            (root / name).write_text("not an image\n")
        rows.append({"path": name, "fine": f"c{i % 4}", "sku": f"SKU-{i}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "sku"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def gallery_csv(tmp_path_factory) -> Path:
    return _write_gallery(tmp_path_factory.mktemp("ray-gallery"))


@pytest.fixture(scope="module")
def extracted(ray_session, tiny_checkpoint, gallery_csv, tmp_path_factory):
    """``(local_dir, ray_dir, ray_run, untouched)``: the gallery extracted locally, and on Ray from a partial copy.

    Starting the actors costs seconds (imports of torch and torchvision), so the module runs Ray once: on a
    directory holding the local run's spec and chunk 3 only. Ray embeds the other five chunks (both chunks with
    unreadable files among them) and must leave chunk 3 alone. ``untouched`` maps chunk 3's file to its mtime.
    """
    encoder = load_encoder(tiny_checkpoint)
    root = tmp_path_factory.mktemp("ray-extract")
    local_dir, ray_dir = root / "local", root / "ray"
    extract_gallery(encoder, tiny_checkpoint, open_gallery(gallery_csv), local_dir, OPTIONS)
    (ray_dir / "chunks").mkdir(parents=True)
    shutil.copy2(local_dir / "extraction.json", ray_dir / "extraction.json")
    kept = EmbeddingStore.open(local_dir).chunk_file(3)
    shutil.copy2(kept, ray_dir / "chunks" / kept.name)
    untouched = {kept.name: (ray_dir / "chunks" / kept.name).stat().st_mtime_ns}
    start = time.perf_counter()
    _, run = extract_gallery_ray(encoder, tiny_checkpoint, open_gallery(gallery_csv), ray_dir, OPTIONS)
    print(f"ray extraction of {COUNT - 8} images: {time.perf_counter() - start:.1f}s (actor start-up included)")
    return local_dir, ray_dir, run, untouched


def _assert_same_chunks(local_dir: Path, ray_dir: Path) -> float:
    """Every chunk equal (positions, metadata rows, skip reports exactly; vectors to 1e-5); returns the max |Δ|."""
    local, remote = EmbeddingStore.open(local_dir), EmbeddingStore.open(ray_dir)
    assert sorted(p.name for p in (ray_dir / "chunks").iterdir()) == sorted(
        p.name for p in (local_dir / "chunks").iterdir()
    )
    max_delta = 0.0
    for chunk in local.spec.chunk_numbers():
        ours, theirs = local.read_chunk(chunk), remote.read_chunk(chunk)
        np.testing.assert_array_equal(theirs.positions, ours.positions)
        assert theirs.rows == ours.rows and theirs.skipped == ours.skipped
        np.testing.assert_allclose(theirs.embeddings, ours.embeddings, rtol=0, atol=1e-5)
        max_delta = max(max_delta, float(np.abs(theirs.embeddings - ours.embeddings).max(initial=0.0)))
    return max_delta


def test_ray_writes_the_chunks_the_local_pipeline_writes(extracted):
    local_dir, ray_dir, run, _ = extracted
    assert run.runtime == "torch" and "2 Ray CPU actors" in run.runtime_reason
    assert (run.chunks_before, run.chunks_written) == (1, 5)
    assert run.images_embedded == COUNT - 8 - 3 and run.images_skipped == 3
    print(f"max |ray - local| over all embeddings: {_assert_same_chunks(local_dir, ray_dir):.3g}")
    skipped = dict(combine_stores([EmbeddingStore.open(ray_dir)]).skipped.skipped)
    names = {Path(p).name: reason for p, reason in skipped.items()}
    assert set(names) == {f"img_{i:03d}.png" for i in (TRUNCATED, EMPTY, NOT_AN_IMAGE)}
    assert names[f"img_{EMPTY:03d}.png"] == "empty file"


def test_ray_leaves_finished_chunks_alone_and_stops_when_all_are_done(extracted, tiny_checkpoint, gallery_csv):
    _, ray_dir, _, untouched = extracted
    assert {name: (ray_dir / "chunks" / name).stat().st_mtime_ns for name in untouched} == untouched
    encoder = load_encoder(tiny_checkpoint)
    _, rerun = extract_gallery_ray(encoder, tiny_checkpoint, open_gallery(gallery_csv), ray_dir, OPTIONS)
    assert (rerun.chunks_before, rerun.chunks_written, rerun.images_embedded) == (6, 0, 0)


def test_ray_and_local_extractions_share_one_spec(extracted, tiny_checkpoint, gallery_csv):
    local_dir = extracted[0]
    ours = extraction_spec(load_encoder(tiny_checkpoint), tiny_checkpoint, open_gallery(gallery_csv), OPTIONS, (0, 1))
    theirs = EmbeddingStore.open(local_dir).spec
    assert ours.model_dump(exclude={"created_at"}) == theirs.model_dump(exclude={"created_at"})
    assert not theirs.resume_differences(ours)


def test_the_index_built_from_either_is_the_same(extracted, tiny_checkpoint, tmp_path):
    local_dir, ray_dir, _, _ = extracted
    outs = {}
    for name, work in (("local", local_dir), ("ray", ray_dir)):
        stored = combine_stores([EmbeddingStore.open(work)])
        outs[name] = tmp_path / name
        index_embeddings(
            stored,
            outs[name],
            "Flat",
            None,
            0.95,
            encoder_path=tiny_checkpoint,
            action="build",
            start=time.perf_counter(),
        )
    queries = combine_stores([EmbeddingStore.open(local_dir)]).embeddings[::5]
    with open_index_dir(outs["local"]) as local, open_index_dir(outs["ray"]) as remote:
        assert local.manifest.count == remote.manifest.count == COUNT - 3
        assert local.manifest.skipped == remote.manifest.skipped == 3
        local_rows = [(r.id, r.path, r.labels, r.extra) for r in local.metadata.iter_rows()]
        assert local_rows == [(r.id, r.path, r.labels, r.extra) for r in remote.metadata.iter_rows()]
        for ours, theirs in zip(local.search(queries, k=5), remote.search(queries, k=5), strict=True):
            assert [h.id for h in theirs.hits] == [h.id for h in ours.hits]
            np.testing.assert_allclose([h.score for h in theirs.hits], [h.score for h in ours.hits], atol=1e-5)


@pytest.mark.slow
def test_a_fresh_ray_extraction_by_one_two_core_actor_equals_the_local_one(
    extracted, tiny_checkpoint, gallery_csv, tmp_path
):
    """From an empty directory (Ray writes the spec too), one actor holding both cores: decoding must run inside
    it (a separate decode task would wait for a free core for ever). Another actor start-up, so slow-marked."""
    encoder, gallery = load_encoder(tiny_checkpoint), open_gallery(gallery_csv)
    _, run = extract_gallery_ray(encoder, tiny_checkpoint, gallery, tmp_path, OPTIONS, num_actors=1, cpus_per_actor=2)
    assert (run.chunks_before, run.chunks_written) == (0, 6) and "1 Ray CPU actor" in run.runtime_reason
    assert _assert_same_chunks(extracted[0], tmp_path) <= 1e-5


def test_another_jobs_directory_is_refused_unless_restarted(extracted, tiny_checkpoint, gallery_csv, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(extracted[0], work)
    other = ExtractOptions(batch_size=4, chunk_size=8, progress=False)
    encoder, gallery = load_encoder(tiny_checkpoint), open_gallery(gallery_csv)
    with pytest.raises(ExtractionMismatchError, match=r"batch_size: 3 vs 4.*--restart"):
        extract_gallery_ray(encoder, tiny_checkpoint, gallery, work, other)
    # The same job begun by ONNX Runtime (local --runtime onnx): PyTorch actors would change its vectors' last bits.
    spec = json.loads((work / "extraction.json").read_text())
    (work / "extraction.json").write_text(json.dumps({**spec, "runtime": "onnx"}))
    with pytest.raises(ExtractionMismatchError, match=r"ONNX Runtime.*--engine local"):
        extract_gallery_ray(encoder, tiny_checkpoint, gallery, work, OPTIONS)
    assert len(list((work / "chunks").iterdir())) == 6  # nothing discarded


def test_onnx_runtime_and_a_foreign_encoder_are_refused(
    ray_session, make_checkpoint, tiny_checkpoint, gallery_csv, tmp_path
):
    gallery = open_gallery(gallery_csv)
    onnx = ExtractOptions(batch_size=3, chunk_size=8, progress=False, runtime="onnx")
    with pytest.raises(ConfigError, match="PyTorch"):
        extract_gallery_ray(load_encoder(tiny_checkpoint), tiny_checkpoint, gallery, tmp_path / "a", onnx)
    with pytest.raises(ExtractionMismatchError, match="not the given"):
        extract_gallery_ray(load_encoder(make_checkpoint(1)), tiny_checkpoint, gallery, tmp_path / "b", OPTIONS)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_ray_the_error_names_the_extra(monkeypatch, tiny_checkpoint, gallery_csv, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    with pytest.raises(RayUnavailableError) as caught:
        extract_gallery_ray(
            load_encoder(tiny_checkpoint), tiny_checkpoint, open_gallery(gallery_csv), tmp_path, OPTIONS
        )
    assert isinstance(caught.value, UserFacingError) and RAY_INSTALL_HINT in str(caught.value)


@pytest.mark.parametrize(
    ("device", "cluster", "actors", "expected"),
    [
        ("cpu", {"CPU": 8.0, "GPU": 2.0}, None, (8, 0, 1)),
        ("auto", {"CPU": 8.0, "GPU": 2.0}, None, (2, 1, 1)),
        ("auto", {"CPU": 6.0}, None, (6, 0, 1)),
        ("cuda", {"CPU": 6.0, "GPU": 4.0}, 3, (3, 1, 1)),
        ("cuda:1", {"CPU": 6.0, "GPU": 1.0}, None, (1, 1, 1)),
        ("auto", {"CPU": 1.0, "GPU": 1.0}, None, (1, 1, 0)),  # the one core is left to decoding
    ],
)
def test_the_actor_pool_follows_the_device_and_the_cluster(device, cluster, actors, expected):
    workers = plan_workers(device, cluster, actors)
    assert (workers.actors, workers.gpus_per_actor, workers.cpus_per_actor) == expected
    # Decoding asks for the CPU actor's cores (so Ray fuses it into the actor), or one core beside a GPU actor.
    assert workers.decode_cpus == (1 if workers.gpus_per_actor else workers.cpus_per_actor)


def test_impossible_actor_pools_are_refused():
    assert plan_workers("cpu", {"CPU": 8.0}, cpus_per_actor=3).actors == 2
    with pytest.raises(ConfigError, match="no GPU"):
        plan_workers("cuda", {"CPU": 8.0})
    with pytest.raises(ConfigError, match="at least 1"):
        plan_workers("cpu", {"CPU": 8.0}, 0)
    with pytest.raises(ConfigError, match="unknown device"):
        plan_workers("tpu", {"CPU": 8.0})
