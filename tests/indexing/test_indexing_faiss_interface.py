"""FaissIndex as a VectorIndex: removal, id-restricted search against brute force, write_to/open, the registry."""

from __future__ import annotations

import numpy as np
import pytest
from clustered import clustered_unit_vectors
from faiss_threads import _one_faiss_thread  # noqa: F401  (autouse fixture)

import indexing.faiss_filter as faiss_filter
import indexing.faiss_index as faiss_index_module
import indexing.vector_index as vector_index
from indexing.faiss_index import INDEX_FILE, NO_ID, FaissIndex, RangeSearchResult, SearchParams
from indexing.manifest import Manifest
from indexing.vector_index import VECTOR_BACKENDS, LabelFilter, VectorIndex, backend_class

DIM = 16
N = 2000
#: Index types of each FAISS seam: exact with an id map, IVF with native ids, a graph, a refine pair over fast-scan,
#: and a flat fast-scan (no FAISS selector at all).
FACTORIES = ("Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ4x4fs,RFlat", "PQ4x4fs")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit vectors (so IVF with one probe really misses), their non-contiguous ids, held-out queries."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    gallery = clustered_unit_vectors(rng, N, DIM, centers)
    queries = clustered_unit_vectors(rng, 30, DIM, centers)
    ids = np.arange(N, dtype=np.int64) * 3 + 7
    return gallery, queries, ids


def _build(factory: str, gallery: np.ndarray, ids: np.ndarray) -> FaissIndex:
    index = FaissIndex(DIM, factory, device="cpu")
    index.train(gallery)
    index.add(gallery, ids)
    return index


def _brute_force(
    gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among the allowed ids, in float64 (the reference every filtered Flat search must equal)."""
    rows = np.flatnonzero(np.isin(ids, allowed))
    sims = queries.astype(np.float64) @ gallery[rows].astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[rows][order]


# ---------------------------------------------------------------------------------------------- the interface


def test_faiss_is_the_registered_vector_backend():
    assert backend_class("faiss") is FaissIndex
    assert VECTOR_BACKENDS.get("faiss") is FaissIndex
    index = FaissIndex(DIM, device="cpu")
    assert isinstance(index, VectorIndex)
    assert index.backend == "faiss" and FaissIndex.files == (INDEX_FILE,) == ("index.faiss",)
    assert not index.stores_labels


def test_shared_values_are_re_exported_unchanged():
    assert NO_ID == vector_index.NO_ID == -1
    assert SearchParams is vector_index.SearchParams and RangeSearchResult is vector_index.RangeSearchResult
    assert {"NO_ID", "SearchParams", "RangeSearchResult", "INDEX_FILE"} <= set(faiss_index_module.__all__)


def test_add_ignores_labels_and_where_is_refused(data):
    gallery, queries, ids = data
    index = FaissIndex(DIM, device="cpu")
    index.add(gallery[:50], ids[:50], labels=[{"coarse": "a"}] * 50)
    assert index.ntotal == 50
    where = LabelFilter("coarse", ("a",))
    with pytest.raises(ValueError, match="allowed_ids"):
        index.search(queries, 5, where=where)
    with pytest.raises(ValueError, match="allowed_ids"):
        index.range_search(queries, 0.5, where=where)


def test_describe_reports_the_faiss_state(data):
    gallery, _, ids = data
    index = _build("IVF16,Flat", gallery, ids)
    index.set_default_params(SearchParams(nprobe=3))
    assert index.describe() == {
        "backend": "faiss",
        "ntotal": N,
        "is_trained": True,
        "nlist": 16,
        "native_ids": True,
        "default_params": {"nprobe": 3},
        "factory": "IVF16,Flat",
    }
    flat = FaissIndex(DIM, device="cpu").describe()
    assert flat["nlist"] is None and flat["native_ids"] is False and flat["default_params"] == {}


# ---------------------------------------------------------------------------------------------- remove


@pytest.mark.parametrize("factory", FACTORIES)
def test_remove_deletes_the_ids_and_searches_never_return_them(factory, data):
    gallery, _, ids = data
    index = _build(factory, gallery, ids)
    params_before = index.default_params
    gone = ids[::5]
    asked = np.concatenate([gone, gone[:10], [10**12, 1]])  # duplicates and absent ids are ignored
    assert index.remove(asked) == gone.size
    assert index.ntotal == N - gone.size
    np.testing.assert_array_equal(np.sort(index.ids()), np.setdiff1d(ids, gone))
    assert index.default_params == params_before  # a rebuilt HNSW keeps its efSearch
    _, found = index.search(gallery[::5], 20)  # the removed vectors themselves as queries
    assert not np.isin(found, gone).any()
    kept = np.setdiff1d(np.arange(N), np.arange(0, N, 5))[:50]
    _, own = index.search(gallery[kept], 5)
    hit = (own == ids[kept][:, None]).any(axis=1).mean()
    assert hit >= (1.0 if factory in ("Flat", "HNSW16", "IVF16,Flat") else 0.9)  # still found after the removal
    assert index.remove(gone) == 0  # already gone
    assert index.remove(np.zeros(0, np.int64)) == 0


def test_remove_refuses_malformed_ids(data):
    gallery, _, ids = data
    index = _build("Flat", gallery[:10], ids[:10])
    with pytest.raises(ValueError, match="1-D"):
        index.remove(ids[:4].reshape(2, 2))
    with pytest.raises(ValueError, match="integers"):
        index.remove(np.array([7.0]))
    assert index.ntotal == 10


def test_a_removed_id_can_be_added_again_and_survives_a_save(data, tmp_path):
    gallery, _, ids = data
    index = _build("IVF16,Flat", gallery, ids)
    index.remove(ids[:3])
    index.add(gallery[:1], ids[:1])
    index.write_to(tmp_path)
    reopened = FaissIndex.open(tmp_path, Manifest(dim=DIM, count=N - 2, encoder_id="x", factory="IVF16,Flat"))
    assert reopened.ntotal == N - 2 and set(reopened.ids().tolist()) == set(ids[3:].tolist()) | {int(ids[0])}


# ---------------------------------------------------------------------------------------------- allowed ids


@pytest.mark.parametrize("share", [0.02, 0.5])
@pytest.mark.parametrize("path", ["subset scan", "faiss selector"])
def test_filtered_flat_search_equals_brute_force_over_the_allowed_subset(share, path, data, monkeypatch):
    gallery, queries, ids = data
    index = _build("Flat", gallery, ids)
    if path == "faiss selector":
        monkeypatch.setattr(faiss_filter, "SUBSET_SCAN_MAX", 0)
    allowed = np.sort(np.random.default_rng(1).choice(ids, size=int(share * N), replace=False))
    scores, found = index.search(queries, 10, allowed_ids=allowed)
    ref_scores, ref_ids = _brute_force(gallery, ids, queries, 10, allowed)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_filtered_search_without_a_faiss_selector_is_exact_over_the_subset(data, monkeypatch):
    """PQ fast-scan has no selector: a small subset is scanned exactly, a large one by a growing k-NN search."""
    gallery, queries, ids = data
    index = _build("PQ4x4fs", gallery, ids)
    stored = dict(zip(index.ids().tolist(), index.reconstruct(index.ids()), strict=True))
    allowed = np.sort(np.random.default_rng(2).choice(ids, size=60, replace=False))
    decoded = np.stack([stored[i] for i in allowed.tolist()])
    scores, found = index.search(queries, 10, allowed_ids=allowed)
    ref_scores, ref_ids = _brute_force(decoded, allowed, queries, 10, allowed)
    np.testing.assert_array_equal(found, ref_ids)  # exact over the stored (decoded) vectors
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    monkeypatch.setattr(faiss_filter, "SUBSET_SCAN_MAX", 8)  # forces the growing k-NN path
    big = np.sort(np.random.default_rng(3).choice(ids, size=600, replace=False))
    scores, found = index.search(queries, 10, allowed_ids=big)
    assert np.isin(found, big).all() and (np.diff(scores, axis=1) <= 0).all()
    all_scores, all_ids = index.search(queries, N)
    first_allowed = np.array([s[np.isin(i, big)][:10] for s, i in zip(all_scores, all_ids, strict=True)])
    np.testing.assert_allclose(scores, first_allowed, atol=1e-5)  # the index's own ranking, filtered (4-bit: ties)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16", "IVF16,PQ4x4fs,RFlat"])
def test_approximate_filtered_search_returns_only_allowed_ids_and_fills_k(factory, data):
    gallery, queries, ids = data
    index = _build(factory, gallery, ids)
    knob = {"IVF16,Flat": SearchParams(nprobe=1), "HNSW16": SearchParams(ef_search=10)}.get(factory)
    unfiltered = _recall(index.search(queries, 10, knob)[1], _brute_force(gallery, ids, queries, 10, ids)[1])
    for size in (15, 40, 1000):  # selective filters miss allowed items in the probed lists / visited graph
        allowed = np.sort(np.random.default_rng(size).choice(ids, size=size, replace=False))
        scores, found = index.search(queries, 10, knob, allowed_ids=allowed)
        assert found.shape == (len(queries), 10)
        assert np.isin(found, allowed).all()  # k hits, every one allowed
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        truth = _brute_force(gallery, ids, queries, 10, allowed)[1]
        # Selective: every list visited / the subset scanned exactly. Broad: as good as the unfiltered search.
        assert _recall(found, truth) >= (0.9 if size < 100 else unfiltered - 0.05)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.isin(t, f).mean() for t, f in zip(truth, found, strict=True)]))


def test_filtered_ivf_widens_nprobe_by_the_allowed_share(data):
    gallery, queries, ids = data
    index = _build("IVF16,Flat", gallery, ids)
    allowed = np.sort(np.random.default_rng(5).choice(ids, size=500, replace=False))  # a quarter of the items
    widened = faiss_filter.widened_params(index, SearchParams(nprobe=2), allowed)
    assert widened.nprobe == 8 and widened.ef_search is None
    assert faiss_filter.widened_params(index, SearchParams(nprobe=2), allowed[:10]).nprobe == 16  # capped at nlist
    truth = _brute_force(gallery, ids, queries, 10, allowed)[1]
    unfiltered_recall = _recall(
        index.search(queries, 10, SearchParams(nprobe=2))[1], index.search(queries, 10, SearchParams(nprobe=16))[1]
    )
    filtered_recall = _recall(index.search(queries, 10, SearchParams(nprobe=2), allowed_ids=allowed)[1], truth)
    # At least as good as the unfiltered search at nprobe 2 (0.86 here); without the widening it is 0.82.
    assert filtered_recall >= max(unfiltered_recall, 0.95)


def test_filtered_hnsw_over_a_large_allowed_set_uses_the_selector_with_a_wider_ef(data, monkeypatch):
    gallery, queries, ids = data
    index = _build("HNSW16", gallery, ids)
    monkeypatch.setattr(faiss_filter, "SUBSET_SCAN_MAX", 0)  # as if the allowed set were too large to scan
    allowed = np.sort(np.random.default_rng(6).choice(ids, size=200, replace=False))
    assert faiss_filter.widened_params(index, SearchParams(ef_search=10), allowed).ef_search == 100
    scores, found = index.search(queries, 10, SearchParams(ef_search=10), allowed_ids=allowed)
    assert np.isin(found, allowed).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    assert _recall(found, _brute_force(gallery, ids, queries, 10, allowed)[1]) >= 0.9


def test_allowed_ids_fewer_than_k_absent_or_none(data):
    gallery, queries, ids = data
    index = _build("Flat", gallery, ids)
    allowed = np.array([ids[5], ids[9], 10**12])  # 10**12 is not stored
    scores, found = index.search(queries, 4, allowed_ids=allowed)
    assert found.shape == (len(queries), 4)
    assert (np.sort(found[:, :2], axis=1) == np.sort(ids[[5, 9]])).all() and (found[:, 2:] == NO_ID).all()
    np.testing.assert_allclose(np.sort(scores[:, :2], axis=1), np.sort(queries @ gallery[[5, 9]].T, axis=1), atol=1e-5)
    _, none = index.search(queries, 4, allowed_ids=np.zeros(0, np.int64))
    assert (none == NO_ID).all()
    with pytest.raises(ValueError, match="allowed_ids"):
        index.search(queries, 4, allowed_ids=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="allowed_ids"):
        index.search(queries, 4, allowed_ids=np.array([0.5]))


@pytest.mark.parametrize(
    ("factory", "scan_max"),
    [
        ("Flat", None),
        ("Flat", 0),
        ("IVF16,Flat", None),
        ("HNSW16", None),
        ("IVF16,PQ4x4fs,RFlat", None),
        ("PQ4x4fs", None),
    ],
)
def test_filtered_range_search_keeps_allowed_hits_above_the_threshold(factory, scan_max, data, monkeypatch):
    gallery, queries, ids = data
    index = _build(factory, gallery, ids)
    if scan_max is not None:  # FAISS's own range search with a selector rather than the subset scan
        monkeypatch.setattr(faiss_filter, "SUBSET_SCAN_MAX", scan_max)
    allowed = np.sort(np.random.default_rng(4).choice(ids, size=500, replace=False))
    threshold = 0.6
    result = index.range_search(queries, threshold, allowed_ids=allowed)
    assert len(result) == len(queries) and result.lims[-1] > 0
    assert np.isin(result.ids, allowed).all() and (result.scores > threshold).all()
    if factory in ("Flat", "IVF16,Flat", "HNSW16"):  # exact: every allowed item above the threshold, and only those
        sims = queries @ gallery.T
        for q in range(len(queries)):
            expected = ids[(sims[q] > threshold) & np.isin(ids, allowed)]
            assert set(result.hits(q)[1].tolist()) == set(expected.tolist())
    if factory == "IVF16,PQ4x4fs,RFlat":  # k-NN fallback over the re-ranked vectors
        knn = index.range_search(queries, threshold, method="knn", allowed_ids=allowed)
        assert knn.fallback and np.isin(knn.ids, allowed).all() and (knn.scores > threshold).all()


# ---------------------------------------------------------------------------------------------- persistence


def test_write_to_and_open_round_trip_through_a_manifest(data, tmp_path):
    gallery, queries, ids = data
    index = _build("IVF16,Flat", gallery, ids)
    assert index.write_to(tmp_path) == {}
    assert (tmp_path / INDEX_FILE).is_file()
    manifest = Manifest(dim=DIM, count=N, encoder_id="x", factory="IVF16,Flat", search_params={"nprobe": 5})
    opened = FaissIndex.open(tmp_path, manifest)
    assert isinstance(opened, FaissIndex) and opened.factory == "IVF16,Flat" and opened.ntotal == N
    assert opened.default_params == SearchParams(nprobe=5)  # the manifest's tuned parameters become the defaults
    np.testing.assert_array_equal(np.sort(opened.ids()), ids)
    expected = index.search(queries, 10, SearchParams(nprobe=5))
    for got, want in zip(opened.search(queries, 10), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    plain = FaissIndex.open(tmp_path, Manifest(dim=DIM, count=N, encoder_id="x", factory="IVF16,Flat"))
    assert plain.default_params == index.default_params


def test_open_reports_a_missing_file_and_mismatched_parameters(data, tmp_path):
    gallery, _, ids = data
    manifest = Manifest(dim=DIM, count=0, encoder_id="x", factory="Flat")
    with pytest.raises(FileNotFoundError):
        FaissIndex.open(tmp_path, manifest)
    _build("Flat", gallery[:10], ids[:10]).write_to(tmp_path)
    with pytest.raises(ValueError, match="nprobe"):
        FaissIndex.open(tmp_path, Manifest(dim=DIM, count=10, encoder_id="x", search_params={"nprobe": 2}))
