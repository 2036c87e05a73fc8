"""``IndexDirectory.search`` split into its two timed stages, and the single-query FAISS thread limit."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexing.faiss_index import FaissIndex
from indexing.index_dir import _faiss_threads_for, open_index_dir, write_index_dir
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow

DIM = 16
COUNT = 300
THRESHOLDS = {"fine": 0.6, "middle": 0.3, "coarse": 0.0}


def _unit(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A real Flat index directory of 300 unit vectors with metadata and thresholds for three levels."""
    path = tmp_path_factory.mktemp("stages") / "idx"
    vectors = _unit(0, COUNT)
    index = FaissIndex(DIM)
    index.add(vectors, np.arange(COUNT) * 3)
    rows = (
        MetadataRow(id=i * 3, path=f"g/{i}.jpg", labels={"fine": f"f{i}", "middle": f"m{i // 10}"}, extra={"n": i})
        for i in range(COUNT)
    )
    manifest = Manifest(dim=DIM, count=COUNT, encoder_id="enc", levels=list(THRESHOLDS), thresholds=dict(THRESHOLDS))
    write_index_dir(path, index, rows, manifest)
    return path, vectors


def test_search_is_nearest_then_join_metadata(calibrated_dir):
    path, vectors = calibrated_dir
    queries = _unit(1, 5)
    with open_index_dir(path) as directory:
        for granularity in (None, "middle"):
            staged = directory.join_metadata(directory.nearest(queries, 8), granularity)
            assert staged == directory.search(queries, 8, granularity=granularity)
        (scores, ids), *_ = directory.nearest(queries, 8)
        (first, *_) = directory.search(queries, 8)
    exact = queries[0] @ vectors.T
    assert ids.tolist() == (np.argsort(-exact)[:8] * 3).tolist()
    np.testing.assert_allclose(scores, np.sort(exact)[::-1][:8], rtol=1e-5, atol=1e-6)
    assert [hit.path for hit in first] == [f"g/{i // 3}.jpg" for i in ids.tolist()]
    assert all(hit.level == next(lv for lv, t in THRESHOLDS.items() if hit.score >= t) for hit in first)


def test_a_single_query_finds_what_the_same_query_finds_in_a_batch(calibrated_dir):
    path, _ = calibrated_dir
    queries = _unit(2, 6)
    with open_index_dir(path) as directory:
        batch = directory.search(queries, 10)
        singles = [directory.search(queries[i : i + 1], 10)[0] for i in range(len(queries))]
        above = [directory.search_above(queries[i : i + 1], 0.2)[0][0] for i in range(len(queries))]
        batch_above, _ = directory.search_above(queries, 0.2)
    assert singles == batch
    assert above == batch_above


def test_a_single_query_searches_with_one_faiss_thread_and_restores_the_count(calibrated_dir):
    path, _ = calibrated_dir
    before = faiss.omp_get_max_threads()
    with _faiss_threads_for(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    with _faiss_threads_for(4):  # a batch keeps every thread
        assert faiss.omp_get_max_threads() == before
    with open_index_dir(path) as directory:
        directory.search(_unit(3, 1), 5)
        directory.search_above(_unit(3, 1), 0.5)
    assert faiss.omp_get_max_threads() == before


def test_the_limit_applies_to_the_searching_thread_only():
    before = faiss.omp_get_max_threads()
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def single_query_search() -> None:
        with _faiss_threads_for(1):
            seen.append(faiss.omp_get_max_threads())
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=single_query_search)
    worker.start()
    assert inside.wait(10)
    in_main = faiss.omp_get_max_threads()  # while the worker holds its limit
    release.set()
    worker.join(10)
    assert seen == [1]
    assert in_main == before
