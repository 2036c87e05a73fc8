"""FaissIndex: exact search equals brute force, the engine's ids survive, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from indexing.faiss_index import NO_ID, FaissIndex


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_flat_search_equals_brute_force_inner_product():
    rng = np.random.default_rng(0)
    gallery, queries = _unit(rng, 300, 24), _unit(rng, 40, 24)
    index = FaissIndex(24)
    index.add(gallery, np.arange(300))
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = _brute_force(gallery, queries, 10)
    assert scores.shape == ids.shape == (40, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_array_equal(ids, ref_ids)  # continuous random data: no ties


def test_arbitrary_int64_ids_are_returned_not_positions():
    rng = np.random.default_rng(1)
    gallery = _unit(rng, 50, 8)
    ids = rng.choice(np.iinfo(np.int64).max, size=50, replace=False).astype(np.int64)
    ids[0], ids[1] = -7, 2**62  # negative ids other than -1 are fine, and huge ones
    index = FaissIndex(8)
    index.add(gallery[:20], ids[:20])
    index.add(gallery[20:], ids[20:])  # a second add keeps the mapping
    _, found = index.search(gallery, 1)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_array_equal(np.sort(index.ids()), np.sort(ids))


def test_k_is_clipped_to_the_number_of_items():
    rng = np.random.default_rng(2)
    index = FaissIndex(4)
    index.add(_unit(rng, 3, 4), np.array([5, 6, 7]))
    scores, ids = index.search(_unit(rng, 2, 4), 10)
    assert ids.shape == (2, 3)
    assert not (ids == NO_ID).any()
    assert set(ids[0].tolist()) == {5, 6, 7}
    empty = FaissIndex(4)
    scores, ids = empty.search(_unit(rng, 2, 4), 5)
    assert scores.shape == ids.shape == (2, 0)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    gallery, queries = _unit(rng, 64, 16), _unit(rng, 5, 16)
    index = FaissIndex(16)
    index.add(gallery, np.arange(1000, 1064))
    index.save(tmp_path / "x.faiss")
    loaded = FaissIndex.load(tmp_path / "x.faiss")
    assert (loaded.dim, loaded.ntotal) == (16, 64)
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("vectors", "ids", "message"),
    [
        (np.ones((2, 3), np.float32) / np.sqrt(3), np.arange(2), "shape"),
        (np.eye(2, 4, dtype=np.int64), np.arange(2), "floating point"),
        (np.eye(2, 4, dtype=np.float32), np.arange(3), "ids must have shape"),
        (np.eye(2, 4, dtype=np.float32), np.array([1.0, 2.0]), "integers"),
        (np.eye(2, 4, dtype=np.float32), np.array([3, 3]), "unique"),
        (np.eye(2, 4, dtype=np.float32), np.array([0, -1]), "reserved"),
        (2 * np.eye(2, 4, dtype=np.float32), np.arange(2), "L2-normalised"),
        (np.full((1, 4), np.nan, np.float32), np.arange(1), "NaN"),
    ],
)
def test_add_refuses_bad_input(vectors, ids, message):
    index = FaissIndex(4)
    with pytest.raises(ValueError, match=message):
        index.add(vectors, ids)
    assert index.ntotal == 0


def test_add_refuses_ids_already_stored():
    index = FaissIndex(4)
    index.add(np.eye(2, 4, dtype=np.float32), np.array([10, 11]))
    with pytest.raises(ValueError, match=r"already in the index: \[11\]"):
        index.add(np.eye(4, dtype=np.float32)[2:], np.array([11, 12]))
    assert index.ntotal == 2


def test_float64_input_is_accepted_and_bad_k_refused():
    index = FaissIndex(4)
    index.add(np.eye(4), np.arange(4))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.eye(4), 0)
    scores, ids = index.search(np.eye(4)[:1], 1)
    assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0)


def test_invalid_factory_string_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid FAISS index factory string 'NoSuchIndex'"):
        FaissIndex(8, "NoSuchIndex")


def test_reconstruct_all_returns_the_stored_vectors_with_their_ids():
    rng = np.random.default_rng(5)
    vectors = _unit(rng, 20, 8)
    ids = np.arange(100, 120, dtype=np.int64)[::-1].copy()
    index = FaissIndex(8)
    index.add(vectors, ids)
    got_ids, got_vectors = index.reconstruct_all()
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_vectors, vectors, atol=1e-7)
