"""Streaming shard merge: the same index as the in-memory merge, built without holding every vector.

Shards are real extraction directories written through ``EmbeddingStore`` (chunk files of seeded clustered
unit vectors, a few skipped items); the reference is ``make_index`` over ``combine_stores``, the in-memory path
``merge_shards`` takes today.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from faiss_threads import _one_faiss_thread  # noqa: F401  (autouse fixture)

from indexing.builder import make_index
from indexing.embedding_store import EmbeddingStore, ExtractionMismatchError, ExtractionSpec, combine_stores
from indexing.errors import IndexFormatError
from indexing.index_dir import open_index_dir, write_index_dir
from indexing.index_factory import training_sample_size
from indexing.manifest import Manifest
from indexing.streaming_merge import open_shards, stream_index
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError


def _clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """Unit vectors around random ``centres``: structure for an IVF to exploit, as real embeddings have."""
    picks = centres[rng.integers(0, len(centres), count)]
    vectors = picks + rng.standard_normal(picks.shape, dtype=np.float32) * 0.35 / np.sqrt(centres.shape[1])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _write_shards(
    root: Path,
    count: int,
    dim: int,
    *,
    shards: int,
    chunk_size: int,
    skip_every: int = 0,
    seed: int = 0,
    metadata: bool = True,
) -> list[Path]:
    """``shards`` extraction directories of one ``count``-item gallery, written chunk by chunk.

    Every ``skip_every``-th position is recorded as an unreadable image instead of a vector. Without
    ``metadata`` the rows are empty (JSON-encoding 200k rows takes seconds).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    dirs = []
    for shard in range(shards):
        spec = ExtractionSpec(
            encoder_id="enc-streaming-test",
            dim=dim,
            gallery_source="synthetic",
            gallery_count=count,
            gallery_fingerprint=f"fp-{count}-{seed}",
            levels=["fine"],
            chunk_size=chunk_size,
            batch_size=32,
            shard_index=shard,
            num_shards=shards,
        )
        store = EmbeddingStore.open_for(root / f"shard-{shard}", spec)
        for chunk in spec.chunk_numbers():
            span = spec.chunk_positions(chunk)
            chunk_rng = np.random.default_rng([seed, chunk])
            lost = [p for p in span if skip_every and p % skip_every == skip_every - 1]
            kept = [p for p in span if p not in lost]
            positions = np.array(kept, np.int64)
            rows = [{"path": f"img_{p}.jpg", "labels": {"fine": f"c{p % 7}"}, "extra": {"sku": f"S{p}"}} for p in kept]
            rows = rows if metadata else [{}] * len(kept)
            skipped = [(f"img_{p}.jpg", "truncated file") for p in lost]
            store.write_chunk(chunk, positions, _clustered(chunk_rng, centres, len(positions)), rows, skipped)
        dirs.append(store.path)
    return dirs


def _in_memory(dirs: list[Path], factory: str, **kwargs):
    stored = combine_stores([EmbeddingStore.open(d) for d in dirs])
    return stored, make_index(stored.embeddings, stored.positions, factory, **kwargs)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> list[Path]:
    """3 shards of a 3,000-item 16-d gallery in chunks of 256, every 97th item unreadable."""
    return _write_shards(tmp_path_factory.mktemp("small"), 3000, 16, shards=3, chunk_size=256, skip_every=97)


def test_flat_streamed_index_equals_the_in_memory_merge(small_shards):
    stored, expected = _in_memory(small_shards, "auto")
    shards = open_shards(list(reversed(small_shards)))  # any order, as merge_shards takes them
    built = stream_index(shards, "auto", batch_bytes=4096)  # several add batches, each one chunk
    assert built.factory == expected.factory == "Flat" and built.reason == expected.reason
    assert built.tuning is None
    assert len(shards) == len(stored) == 3000 - 30
    assert np.array_equal(built.index.ids(), expected.index.ids())
    ids, vectors = built.index.reconstruct_all()
    assert np.array_equal(ids, stored.positions) and np.array_equal(vectors, stored.embeddings)
    assert list(shards.metadata_rows()) == stored.metadata_rows()
    assert shards.skipped.skipped == stored.skipped.skipped


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,PQ8x4np"])
def test_ivf_streamed_index_uses_the_in_memory_sample_and_reaches_the_target(tmp_path, factory):
    dirs = _write_shards(tmp_path, 12_000, 32, shards=2, chunk_size=1000, skip_every=251)
    _, expected = _in_memory(dirs, factory, target_recall=0.9)
    built = stream_index(open_shards(dirs), factory, target_recall=0.9)
    assert built.tuning is not None and built.tuning.reached and built.tuning.lower_bound >= 0.9
    assert built.tuning.num_queries == 500 and built.tuning.held_out
    assert built.tuning == expected.tuning  # same held-out queries, same trained quantisers, same lists
    assert np.array_equal(built.index.ids(), expected.index.ids())  # inverted lists filled in the same order
    queries = _clustered(np.random.default_rng(7), expected.index.reconstruct_all()[1][:64], 50)
    assert np.array_equal(built.index.search(queries, 10)[1], expected.index.search(queries, 10)[1])


def test_streamed_rows_fill_an_index_directory_like_the_in_memory_ones(small_shards, tmp_path):
    shards = open_shards(small_shards)
    built = stream_index(shards, "Flat")
    manifest = Manifest(
        dim=built.index.dim,
        count=built.index.ntotal,
        encoder_id=shards.spec.encoder_id,
        levels=list(shards.spec.levels),
        skipped=len(shards.skipped),
        **built.manifest_fields(),
    )
    out = write_index_dir(tmp_path / "index", built.index, shards.metadata_rows(), manifest, skipped=shards.skipped)
    with open_index_dir(out) as directory:
        assert directory.manifest.count == 2970
        row = directory.metadata.get(1234)
        assert row.path == "img_1234.jpg" and row.labels == {"fine": "c2"} and row.extra == {"sku": "S1234"}
        assert directory.metadata.get(96) is None  # an unreadable item has no row
    assert (out / "skipped.tsv").read_text().count("truncated file") == 30


def test_shard_problems_are_refused_with_the_in_memory_messages(small_shards):
    for given in (small_shards[:2], [*small_shards, small_shards[1]], []):
        with pytest.raises(ExtractionMismatchError) as in_memory:
            combine_stores([EmbeddingStore.open(d) for d in given])
        with pytest.raises(ExtractionMismatchError) as streamed:
            open_shards(given)
        assert str(streamed.value) == str(in_memory.value)
    assert len(open_shards(small_shards)) == 2970


def test_a_chunk_that_does_not_fit_its_spec_fails_before_any_vector_is_read(tmp_path):
    dirs = _write_shards(tmp_path, 600, 8, shards=2, chunk_size=100)
    rows = np.array(["{}"] * 100)
    no_skips = np.zeros(0, str)
    np.savez(  # chunk 4 of the second shard with 9-d vectors where the spec says 8
        EmbeddingStore.open(dirs[1]).chunk_file(4),
        positions=np.arange(400, 500),
        embeddings=np.ones((100, 9), np.float32) / 3,
        rows=rows,
        skipped_paths=no_skips,
        skipped_reasons=no_skips,
    )
    with pytest.raises(IndexFormatError, match="does not hold chunk 4"):
        open_shards(dirs)


def test_bad_options_and_an_empty_gallery_are_refused(tmp_path, small_shards):
    shards = open_shards(small_shards)
    with pytest.raises(ConfigError, match="memory budget only applies"):
        stream_index(shards, "IVF32,Flat", memory_budget="1GB")
    with pytest.raises(ConfigError, match="target recall"):
        stream_index(shards, "auto", target_recall=1.5)
    with pytest.raises(ConfigError, match="cannot be trained"):
        stream_index(shards, "IVF4096,Flat")  # more lists than vectors
    empty = _write_shards(tmp_path, 50, 8, shards=1, chunk_size=25, skip_every=1)
    with pytest.raises(DatasetError, match="none of the 50 images could be read"):
        stream_index(open_shards(empty), "Flat")


def _peak_traced(build) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = build()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_streaming_peak_memory_stays_well_below_the_gallery(tmp_path):
    """200k x 128 float32 = 102 MB of vectors, merged into IVF-PQ: numpy allocations are traced by tracemalloc.

    50 tuning queries rather than 500: ``FaissIndex.tune``'s exact scan holds, per block of 16,384 stored
    vectors, the queries' similarities, their negation and an argpartition (16 bytes per query and vector:
    131 MB at 500 queries, whatever the gallery size), which would hide what this test measures. (The in-memory
    merge peaks above twice the vectors: ``combine_stores`` alone holds the chunks and their concatenation.)
    """
    count, dim, factory = 200_000, 128, "IVF256,PQ16x4np"
    dirs = _write_shards(tmp_path, count, dim, shards=4, chunk_size=4096, metadata=False)
    raw = count * dim * 4
    streamed_peak, built = _peak_traced(
        lambda: stream_index(open_shards(dirs), factory, target_recall=0.9, num_tune_queries=50)
    )
    assert built.index.ntotal == count and built.tuning is not None and built.tuning.reached
    assert streamed_peak < 0.4 * raw, f"streaming merge peaked at {streamed_peak / raw:.0%} of the vectors"
    sample = training_sample_size(factory, count) * dim * 4  # 16,384 vectors, gathered before training
    assert streamed_peak > sample  # the tracer does see the merge's arrays
