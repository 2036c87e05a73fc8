"""Refine and fast-scan indexes (IVF_HNSW + 4-bit PQ + re-ranking store), k_factor, tuning, memory estimates,
held-out tuning in ``make_index``; checked against brute-force ground truth on real FAISS indexes."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
from clustered import clustered_unit_vectors
from faiss_threads import _one_faiss_thread  # noqa: F401  (autouse fixture)

import indexing.faiss_index as faiss_index_module
from indexing.builder import make_index
from indexing.faiss_index import FaissIndex, SearchParams, per_query_recall, recall_at_k, recall_lower_bound
from indexing.index_factory import choose_factory, estimate_index_bytes, training_sample_size

DIM = 32
N = 6000
REFINE_FACTORIES = [
    "IVF32_HNSW32,PQ16x4fs,RFlat",
    "IVF32,PQ16x4fs,Refine(SQfp16)",
    "IVF32_HNSW32,PQ16x4fs,Refine(SQ8)",
    "HNSW32_SQ8,RFlat",
]
#: How far each refine store's reconstructed vectors may be from the originals (max abs per coordinate).
STORE_TOLERANCE = {"RFlat": 0.0, "Refine(SQfp16)": 1e-3, "Refine(SQ8)": 0.02}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery, queries, ids): overlapping clusters, fresh queries from the same clusters, scattered int64 ids."""
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((150, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    ids = rng.choice(2**62, size=N, replace=False).astype(np.int64) - 2**61
    return clustered_unit_vectors(rng, N, DIM, centers), clustered_unit_vectors(rng, 300, DIM, centers), ids


def _truth(gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module")
def built(data) -> dict[str, FaissIndex]:
    gallery, _, ids = data
    out = {}
    for factory in REFINE_FACTORIES:
        index = FaissIndex(DIM, factory, device="cpu")
        index.train(gallery)
        index.add(gallery, ids)
        out[factory] = index
    return out


def _wide(factory: str, k_factor: int = 16) -> SearchParams:
    base = {"ef_search": 256} if factory.startswith("HNSW") else {"nprobe": 32}
    return SearchParams(**base, k_factor=k_factor)


@pytest.mark.parametrize("factory", REFINE_FACTORIES)
def test_refine_indexes_keep_the_engines_ids_and_find_the_true_neighbours(built, data, factory):
    gallery, queries, ids = data
    index = built[factory]
    assert index.is_refine and not index.native_ids  # IndexRefine takes no ids: an IndexIDMap2 gives them
    assert index.ntotal == N and set(index.ids().tolist()) == set(ids.tolist())
    scores, found = index.search(queries, 10, _wide(factory))
    assert np.isin(found, ids).all() and np.all(np.diff(scores, axis=1) <= 1e-6)
    assert recall_at_k(found, _truth(gallery, ids, queries)) > 0.9
    narrow = index.search(queries, 10, SearchParams(k_factor=1))[1]  # defaults: nprobe 1 / efSearch 16
    assert recall_at_k(narrow, _truth(gallery, ids, queries)) < recall_at_k(found, _truth(gallery, ids, queries))


@pytest.mark.parametrize("factory", REFINE_FACTORIES)
def test_reconstruct_returns_the_refine_stores_vectors(built, data, factory):
    gallery, _, ids = data
    store = factory.rsplit(",", 1)[1]
    vectors = built[factory].reconstruct(ids[::500])
    assert np.abs(vectors - gallery[::500]).max() <= STORE_TOLERANCE[store] + 1e-7
    all_ids, all_vectors = built[factory].reconstruct_all()
    np.testing.assert_array_equal(all_ids, ids)  # id-map order = insertion order
    assert np.abs(all_vectors - gallery).max() <= STORE_TOLERANCE[store] + 1e-7


def test_k_factor_deepens_reranking_and_is_refused_where_it_does_not_apply(built, data):
    gallery, queries, ids = data
    index = built["IVF32_HNSW32,PQ16x4fs,RFlat"]
    truth = _truth(gallery, ids, queries)
    shallow = recall_at_k(index.search(queries, 10, SearchParams(nprobe=32, k_factor=1))[1], truth)
    deep = recall_at_k(index.search(queries, 10, SearchParams(nprobe=32, k_factor=32))[1], truth)
    assert deep > shallow + 0.05 and deep > 0.97  # 4-bit codes alone mis-rank; exact re-ranking fixes it
    plain = FaissIndex(DIM, "IVF32,Flat", device="cpu")
    with pytest.raises(ValueError, match="k_factor applies to refine indexes"):
        plain.search(queries, 10, SearchParams(k_factor=4))
    with pytest.raises(ValueError, match="ef_search applies to HNSW"):
        index.search(queries, 10, SearchParams(ef_search=32))
    with pytest.raises(ValueError, match="k_factor must be a positive integer"):
        SearchParams(k_factor=0)


def test_search_params_round_trip_with_k_factor_and_read_old_manifests():
    params = SearchParams(nprobe=12, k_factor=8)
    assert params.to_dict() == {"nprobe": 12, "k_factor": 8}
    assert SearchParams.from_dict(params.to_dict()) == params
    assert SearchParams.from_dict({"nprobe": 5}) == SearchParams(nprobe=5)  # a manifest written before k_factor
    with pytest.raises(ValueError, match="valid: nprobe, efSearch, k_factor"):
        SearchParams.from_dict({"kfactor": 3})


@pytest.mark.parametrize("factory", ["IVF32_HNSW32,PQ16x4fs,Refine(SQ8)", "HNSW32_SQ8,RFlat"])
def test_save_and_load_keep_vectors_ids_and_the_default_k_factor(built, data, tmp_path: Path, factory):
    _, queries, ids = data
    index = built[factory]
    index.set_default_params(_wide(factory, k_factor=6))
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", factory, device="cpu")
    assert loaded.default_params == index.default_params and loaded.default_params.k_factor == 6
    np.testing.assert_array_equal(loaded.ids(), ids)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


@pytest.mark.parametrize("factory", ["IVF32_HNSW32,PQ16x4fs,RFlat", "HNSW32_SQ8,RFlat"])
def test_tune_finds_the_cheapest_pair_through_the_refine_wrapper(built, data, factory):
    gallery, queries, ids = data
    index = built[factory]
    result = index.tune(queries[:200], target_recall=0.95, k=10)
    assert result.reached and result.held_out and result.num_queries == 200
    params = result.params
    assert params.k_factor is not None and index.default_params == params  # applied, k_factor included
    name = "nprobe" if params.nprobe is not None else "ef_search"
    value = getattr(params, name)
    truth = _truth(gallery, ids, queries[:200])
    assert recall_at_k(index.search(queries[:200], 10, params)[1], truth) == pytest.approx(result.recall)
    if value > (1 if name == "nprobe" else 10):  # the smallest base value for that depth: one less misses
        less = SearchParams(**{name: value - 1, "k_factor": params.k_factor})
        found = index.search(queries[:200], 10, less)[1]
        assert recall_lower_bound(per_query_recall(found, truth)) < 0.95  # the bound tuning decides by


def test_range_search_on_a_refine_index_uses_reranked_scores(built, data, caplog):
    gallery, queries, ids = data
    index = built["IVF32_HNSW32,PQ16x4fs,RFlat"]
    assert not index.supports_range_search
    with caplog.at_level(logging.WARNING):
        result = index.range_search(queries[:5], 0.5, _wide("IVF", k_factor=64))
    assert result.fallback and "k-NN search" in caplog.text
    sims = queries[:5] @ gallery.T
    for row in range(5):
        scores, found = result.hits(row)
        expected = set(ids[sims[row] > 0.5].tolist())
        assert set(found.tolist()) <= expected and len(found) >= 0.9 * len(expected)
        np.testing.assert_allclose(scores, np.sort(sims[row][np.isin(ids, found)])[::-1], atol=1e-5)


@pytest.mark.parametrize(
    "factory",
    [
        "IVF64_HNSW32,PQ16x4fs,RFlat",
        "IVF64_HNSW32,PQ16x4fs,Refine(SQfp16)",
        "IVF64_HNSW32,PQ16x4fs,Refine(SQ8)",
        "IVF64,PQ8x4fs,RFlat",
        "HNSW32_SQ8,RFlat",
    ],
)
def test_memory_estimate_models_fast_scan_codes_refine_stores_and_coarse_graphs(data, factory):
    gallery, _, ids = data
    index = FaissIndex(DIM, factory, device="cpu")
    index.train(gallery)
    index.add(gallery, ids)
    serialized = len(faiss.serialize_index(index.faiss_index))
    # In memory the id map also keeps a reverse hash map (IDMAP_BYTES_PER_VECTOR = 48, 8 of them serialized).
    estimate = estimate_index_bytes(factory, N, DIM) - 40 * N
    assert abs(estimate - serialized) <= 0.15 * serialized, (estimate, serialized)


def test_memory_estimate_orders_the_refine_stores_by_bytes_per_dimension():
    n, d = 1_000_000, 512
    sizes = [estimate_index_bytes(f"IVF4096_HNSW32,PQ128x4fs,{r}", n, d) for r in ("RFlat", "Refine(SQfp16)")]
    sizes.append(estimate_index_bytes("IVF4096_HNSW32,PQ128x4fs,Refine(SQ8)", n, d))
    assert sizes[0] - sizes[1] == pytest.approx(2 * d * n, rel=1e-6)  # 4d -> 2d bytes per vector
    assert sizes[1] - sizes[2] == pytest.approx(d * n, rel=1e-6)  # 2d -> d
    codes = estimate_index_bytes("IVF4096,PQ128x4fs", n, d) - estimate_index_bytes("IVF4096,PQ64x4fs", n, d)
    assert codes == 32 * n + 4096 * 16 * 32  # 64 more 4-bit codes = 32 B per vector, and per list half a padded block
    assert training_sample_size("IVF64,PQ16x4fs,Refine(SQ8)", 10**6) == 65_536  # the SQ8 store trains too


def test_two_level_coarse_training_fills_every_list(data, monkeypatch):
    gallery, queries, ids = data
    monkeypatch.setattr(faiss_index_module, "TWO_LEVEL_MIN_NLIST", 64)
    index = FaissIndex(DIM, "IVF64_HNSW32,PQ16x4fs,RFlat", device="cpu")
    index.train(gallery)
    quantizer = faiss_index_module._ivf_of(index.faiss_index).quantizer
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    assert quantizer.ntotal == 64 and np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)
    index.add(gallery, ids)
    found = index.search(queries, 10, SearchParams(nprobe=64, k_factor=16))[1]
    assert recall_at_k(found, _truth(gallery, ids, queries)) > 0.95


def test_make_index_tunes_on_held_out_queries_and_reports_the_recall(data):
    gallery, queries, ids = data
    built = make_index(gallery, ids, "IVF32_HNSW32,PQ16x4fs,RFlat", target_recall=0.9, num_tune_queries=300)
    tuning = built.tuning
    assert tuning is not None and tuning.held_out and tuning.num_queries == 300 and tuning.reached
    assert built.index.ntotal == N and set(built.index.ids().tolist()) == set(ids.tolist())  # held-out added back
    fields = built.manifest_fields()
    assert fields["search_params"]["k_factor"] == tuning.params.k_factor and fields["tuning"]["held_out"] is True
    # Fresh queries, never seen: the tuned defaults land near the target (300 queries: +-0.03 of sampling noise).
    fresh = recall_at_k(built.index.search(queries, 10)[1], _truth(gallery, ids, queries))
    assert fresh >= 0.9 - 0.03
    explicit = make_index(gallery, ids, "IVF32,Flat", target_recall=0.9, tune_queries=queries[:100])
    assert explicit.tuning.held_out and explicit.tuning.num_queries == 100


def test_auto_without_a_budget_uses_the_default_and_says_so():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = make_index(vectors, np.arange(200), "auto")
    assert built.factory == "Flat" and "the default: half of this machine's RAM" in built.reason
    assert choose_factory(60_000, 32).factory == "IVF1024_HNSW32,PQ8x4fs,RFlat"


def test_the_hnsw_graph_over_the_centroids_searches_wide_enough_to_assign_vectors_right(built, data, tmp_path):
    gallery, _, _ = data
    index = built["IVF32_HNSW32,PQ16x4fs,RFlat"]
    quantizer = faiss.downcast_index(faiss_index_module._ivf_of(index.faiss_index).quantizer)
    assert quantizer.hnsw.efSearch == faiss_index_module.COARSE_EF_SEARCH  # FAISS's 16 mis-assigns ~3% at 4096 lists
    exact = faiss.IndexFlatIP(DIM)
    exact.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    assert (quantizer.search(gallery, 1)[1] == exact.search(gallery, 1)[1]).mean() > 0.999
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", "IVF32_HNSW32,PQ16x4fs,RFlat", device="cpu")
    loaded_quantizer = faiss.downcast_index(faiss_index_module._ivf_of(loaded.faiss_index).quantizer)
    assert loaded_quantizer.hnsw.efSearch == faiss_index_module.COARSE_EF_SEARCH


def test_an_index_written_with_faiss_default_coarse_width_is_widened_on_load(built, tmp_path):
    index = built["IVF32_HNSW32,PQ16x4fs,RFlat"]
    quantizer = faiss.downcast_index(faiss_index_module._ivf_of(index.faiss_index).quantizer)
    quantizer.hnsw.efSearch = 16  # what FAISS writes by default, as files from before COARSE_EF_SEARCH hold
    try:
        index.save(tmp_path / "old.faiss")
    finally:
        quantizer.hnsw.efSearch = faiss_index_module.COARSE_EF_SEARCH
    loaded = FaissIndex.load(tmp_path / "old.faiss", "IVF32_HNSW32,PQ16x4fs,RFlat", device="cpu")
    loaded_quantizer = faiss.downcast_index(faiss_index_module._ivf_of(loaded.faiss_index).quantizer)
    assert loaded_quantizer.hnsw.efSearch == faiss_index_module.COARSE_EF_SEARCH
