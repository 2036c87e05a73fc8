"""Approximate FAISS indexes against brute-force ground truth, tuning, range search and the factory choice."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from clustered import clustered_unit_vectors
from faiss_threads import _one_faiss_thread  # noqa: F401  (autouse fixture)

from indexing.faiss_index import (
    NO_ID,
    FaissIndex,
    SearchParams,
    gpu_available,
    per_query_recall,
    recall_at_k,
    recall_lower_bound,
)
from indexing.index_factory import (
    choose_factory,
    default_memory_budget,
    estimate_index_bytes,
    ivf_nlist,
    training_sample_size,
)

DIM = 32
N = 5000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery, queries, ids): 5k clustered vectors, 200 fresh queries from the same clusters, random int64 ids."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    gallery = clustered_unit_vectors(rng, N, DIM, centers)
    queries = clustered_unit_vectors(rng, 200, DIM, centers)
    ids = rng.choice(2**62, size=N, replace=False).astype(np.int64) - 2**61  # negative ids too
    return gallery, queries, ids


def _brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def _build(factory: str, gallery: np.ndarray, ids: np.ndarray) -> FaissIndex:
    index = FaissIndex(DIM, factory, device="cpu")
    index.train(gallery)
    index.add(gallery, ids)
    return index


#: factory, search parameters, recall@10 floor against brute force (measured: 1.0, 0.999, 0.96, 0.72).
APPROXIMATE = [
    ("Flat", None, 1.0),
    ("HNSW32", SearchParams(ef_search=64), 0.97),
    ("IVF64,Flat", SearchParams(nprobe=16), 0.9),
    ("IVF64,PQ8np", SearchParams(nprobe=16), 0.6),  # np: no polysemous training, which is slow and unused
]


@pytest.fixture(scope="module")
def built(data) -> dict[str, FaissIndex]:
    gallery, _, ids = data
    return {factory: _build(factory, gallery, ids) for factory, _, _ in APPROXIMATE}


@pytest.mark.parametrize(("factory", "params", "floor"), APPROXIMATE, ids=[a[0] for a in APPROXIMATE])
def test_recall_at_10_against_brute_force(data, built, factory, params, floor):
    gallery, queries, ids = data
    index = built[factory]
    scores, found = index.search(queries, 10, params)
    _, truth = _brute_force(gallery, queries, 10)
    recall = recall_at_k(found, ids[truth])  # continuous data: distinct vectors, no ties
    assert recall >= floor, f"{factory}: recall@10 {recall:.3f} < {floor}"
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_search_params_survive_faiss_torch_utils(data, built):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps every index's search methods."""
    import faiss.contrib.torch_utils  # noqa: F401  (patches faiss for the rest of the process, as PML does)

    _, queries, _ = data
    ivf = built["IVF64,Flat"]
    wide = ivf.search(queries, 10, SearchParams(nprobe=64))
    assert wide[1].shape == (len(queries), 10)
    result = ivf.range_search(queries[:3], 0.5, SearchParams(nprobe=64))
    assert not result.fallback


@pytest.mark.parametrize("factory", [a[0] for a in APPROXIMATE])
def test_ids_round_trip_for_every_type(data, built, factory):
    gallery, queries, ids = data
    index = built[factory]
    assert index.native_ids == ("IVF" in factory)  # IVF lists store ids; the rest is wrapped in IndexIDMap2
    np.testing.assert_array_equal(np.sort(index.ids()), np.sort(ids))
    got_ids, vectors = index.reconstruct_all()
    position = {item: i for i, item in enumerate(ids.tolist())}
    rows = np.array([position[i] for i in got_ids.tolist()])
    error = np.linalg.norm(vectors - gallery[rows], axis=1).max()
    assert error < (1e-5 if "PQ" not in factory else 0.8)
    order = {item: i for i, item in enumerate(got_ids.tolist())}
    sample = ids[[3, 0, 4999]]
    np.testing.assert_allclose(index.reconstruct(sample), vectors[[order[i] for i in sample.tolist()]], atol=1e-6)
    _, found = index.search(queries, 5)
    assert np.isin(found[found != NO_ID], ids).all()
    if "PQ" not in factory:  # a stored vector finds itself first under its own id
        exhaustive = SearchParams(nprobe=64) if "IVF" in factory else SearchParams(ef_search=256)
        _, top = index.search(gallery[:100], 1, None if factory == "Flat" else exhaustive)
        np.testing.assert_array_equal(top[:, 0], ids[:100])


def test_reconstruct_by_id_matches_the_stored_vectors(data, built):
    gallery, _, ids = data
    for factory in ("Flat", "HNSW32", "IVF64,Flat"):
        np.testing.assert_allclose(built[factory].reconstruct(ids[[5, 0, 4000]]), gallery[[5, 0, 4000]], atol=1e-6)
    with pytest.raises(ValueError, match="not in the index"):
        built["IVF64,Flat"].reconstruct(np.array([ids.max() + 1]))


@pytest.mark.parametrize(("factory", "target"), [("HNSW32", 0.99), ("IVF64,Flat", 0.9), ("IVF64,PQ8np", 0.9)])
def test_tune_reaches_the_target_with_the_smallest_value(data, factory, target):
    gallery, queries, ids = data
    index = _build(factory, gallery, ids)
    result = index.tune(target_recall=target, k=10, num_queries=200)
    assert result.reached and result.recall >= target and result.num_queries == 200
    assert result.params.to_dict().items() <= index.default_params.to_dict().items()  # stored as the default
    # gallery embeddings as queries, each left out of its own results (what a builder would pass)
    originals = index.tune(gallery[:200], target_recall=target, k=10, query_ids=ids[:200], apply=False)
    assert originals.reached and originals.num_queries == 200
    # the same measurement with explicit queries: ground truth = brute force over the stored vectors
    stored_ids, stored = index.reconstruct_all()
    result = index.tune(queries, target_recall=target, k=10)
    _, truth = _brute_force(stored, queries, 10)

    def recall(params: SearchParams) -> float:
        return recall_at_k(index.search(queries, 10, params)[1], stored_ids[truth])

    def bound(params: SearchParams) -> float:
        return recall_lower_bound(per_query_recall(index.search(queries, 10, params)[1], stored_ids[truth]))

    assert recall(result.params) == pytest.approx(result.recall) and result.recall >= target
    assert bound(result.params) == pytest.approx(result.lower_bound) and result.lower_bound >= target
    name, value = next(iter(_set(result.params).items()))
    assert value > (1 if name == "nprobe" else 10)  # the data is hard enough that the smallest value fails
    assert bound(SearchParams(**{name: value - 1})) < target  # one less misses the target (at 95% confidence)


def _set(params: SearchParams) -> dict[str, int]:
    return {key: value for key, value in vars(params).items() if value is not None}


def test_tune_on_flat_measures_exact_recall_and_changes_nothing(data, built):
    result = built["Flat"].tune(target_recall=0.99, k=5, num_queries=50)
    assert result.params == SearchParams() and result.recall == pytest.approx(1.0) and result.reached


def _range_truth(gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, threshold: float) -> list[set[int]]:
    sims = queries @ gallery.T
    return [set(ids[row > threshold].tolist()) for row in sims]


def _borderline(gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, threshold: float) -> list[set[int]]:
    sims = queries @ gallery.T
    return [set(ids[np.abs(row - threshold) < 1e-5].tolist()) for row in sims]


def _assert_range_equal(result, gallery, ids, queries, threshold):
    truth = _range_truth(gallery, ids, queries, threshold)
    border = _borderline(gallery, ids, queries, threshold)
    assert len(result) == len(queries)
    counts = []
    for i in range(len(queries)):
        scores, found = result.hits(i)
        assert np.all(np.diff(scores) <= 0) and np.all(scores > threshold)
        assert not (set(found.tolist()) ^ truth[i]) - border[i], f"query {i}"
        counts.append(len(found))
    return counts


@pytest.mark.parametrize(("factory", "params"), [("Flat", None), ("IVF64,Flat", SearchParams(nprobe=64))])
def test_native_range_search_equals_brute_force(data, built, factory, params):
    gallery, queries, ids = data
    index = built[factory]
    assert index.supports_range_search
    threshold = 0.4
    result = index.range_search(queries[:50], threshold, params)
    assert not result.fallback
    counts = _assert_range_equal(result, gallery, ids, queries[:50], threshold)
    assert max(counts) > 64 and min(counts) < max(counts)  # some queries need the fallback's doubling


def test_knn_fallback_equals_brute_force(data, built, caplog):
    gallery, queries, ids = data
    result = built["Flat"].range_search(queries[:50], 0.4, method="knn")
    assert result.fallback
    _assert_range_equal(result, gallery, ids, queries[:50], 0.4)
    empty = built["Flat"].range_search(queries[:3], 1.01, method="knn")  # nothing above: three empty queries
    assert empty.lims.tolist() == [0, 0, 0, 0]


def test_range_search_falls_back_and_says_so_where_faiss_lacks_it(data, caplog):
    gallery, queries, ids = data
    index = _build("NSG32,Flat", gallery[:1500], ids[:1500])  # FAISS has no range search for NSG
    assert not index.supports_range_search
    # A search beam as wide as the index makes NSG's k-NN search exhaustive, hence exact, so the
    # fallback's growing-k logic can be checked against brute force without approximation noise.
    faiss.downcast_index(index.faiss_index.index).nsg.search_L = 1500
    with caplog.at_level(logging.WARNING, logger="indexing.faiss_index"):
        result = index.range_search(queries[:20], 0.3)
    assert result.fallback and "growing k" in caplog.text
    counts = _assert_range_equal(result, gallery[:1500], ids[:1500], queries[:20], 0.3)
    assert max(counts) > 64  # k doubled at least once
    with pytest.raises(ValueError, match="no native range search"):
        index.range_search(queries[:2], 0.8, method="native")


def test_opq_pretransform_keeps_native_ids_and_survives_save_load(data, tmp_path):
    gallery, queries, ids = data
    index = _build("OPQ8,IVF16,PQ8x4np", gallery[:1000], ids[:1000])  # 4-bit codes keep OPQ training short
    assert index.native_ids and index.nlist == 16
    np.testing.assert_array_equal(np.sort(index.ids()), np.sort(ids[:1000]))
    _, truth = _brute_force(gallery[:1000], queries, 10)
    assert recall_at_k(index.search(queries, 10, SearchParams(nprobe=16))[1], ids[:1000][truth]) > 0.3
    index.save(tmp_path / "opq.faiss")
    loaded = FaissIndex.load(tmp_path / "opq.faiss", factory="OPQ8,IVF16,PQ8x4np", device="cpu")
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])


def test_search_params_apply_per_call_and_are_checked(data, built):
    _, queries, _ = data
    ivf = built["IVF64,Flat"]
    default = ivf.search(queries, 10)
    wide = ivf.search(queries, 10, SearchParams(nprobe=64))
    assert not np.array_equal(default[1], wide[1])  # default nprobe=1 misses neighbours nprobe=64 finds
    assert ivf.default_params == SearchParams(nprobe=1)  # a per-call parameter changes no default
    with pytest.raises(ValueError, match="ef_search applies to HNSW"):
        ivf.search(queries, 10, SearchParams(ef_search=32))
    with pytest.raises(ValueError, match="nprobe applies to IVF"):
        built["HNSW32"].search(queries, 10, SearchParams(nprobe=4))
    with pytest.raises(ValueError, match="positive integer"):
        SearchParams(nprobe=0)
    assert SearchParams.from_dict(SearchParams(nprobe=3, ef_search=7).to_dict()) == SearchParams(3, 7)


@pytest.mark.parametrize("factory", [a[0] for a in APPROXIMATE])
def test_save_load_round_trip_keeps_results_and_defaults(data, tmp_path, factory):
    gallery, queries, ids = data
    index = _build(factory, gallery, ids)
    if factory != "Flat":
        index.set_default_params(SearchParams(nprobe=5) if "IVF" in factory else SearchParams(ef_search=40))
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", factory=factory, device="cpu")
    assert (loaded.ntotal, loaded.dim, loaded.default_params) == (N, DIM, index.default_params)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_uses_a_seeded_sample_of_adequate_size(data, caplog):
    gallery, _, _ = data
    with caplog.at_level(logging.INFO, logger="indexing.faiss_index"):
        FaissIndex(DIM, "IVF16,Flat", device="cpu").train(gallery)
    assert f"on {16 * 64} sample vectors" in caplog.text
    centroids = []
    for seed in (3, 3, 4):
        index = FaissIndex(DIM, "IVF16,Flat", device="cpu")
        index.train(gallery, seed=seed)
        centroids.append(index.faiss_index.quantizer.reconstruct_n(0, 16))
    np.testing.assert_array_equal(centroids[0], centroids[1])  # same seed, same sample, same centroids
    assert not np.array_equal(centroids[0], centroids[2])


# ------------------------------------------------------------------ choose_factory


def test_small_galleries_get_exact_search():
    choice = choose_factory(20_000, 512, None)
    assert choice.factory == "Flat" and choice.nlist is None and "20k vectors x 512-d" in choice.reason


def test_from_50k_on_the_refine_family_wins_and_large_galleries_get_more_lists():
    mid = choose_factory(200_000, 512, None)
    assert mid.factory == "IVF2048_HNSW32,PQ128x4fs,RFlat" and mid.nlist == 2048
    large = choose_factory(1_000_000, 512, None)
    assert large.factory == "IVF4096_HNSW32,PQ128x4fs,RFlat" and large.nlist == 4096  # the wiki's IVF4096 for 1M
    assert "re-ranked from the full float32 vectors" in large.reason and "measured at 1M" in large.reason
    huge = choose_factory(20_000_000, 768, 10**12)
    assert huge.factory == "IVF65536_HNSW32,PQ192x4fs,RFlat" and huge.nlist == 65536


def test_a_tightening_budget_degrades_the_refine_store_then_drops_it_and_says_why():
    n, d = 1_200_000, 512
    full = estimate_index_bytes("IVF4096_HNSW32,PQ128x4fs,RFlat", n, d)
    fp16 = estimate_index_bytes("IVF4096_HNSW32,PQ128x4fs,Refine(SQfp16)", n, d)
    sq8 = estimate_index_bytes("IVF4096_HNSW32,PQ128x4fs,Refine(SQ8)", n, d)
    assert full > fp16 > sq8
    assert choose_factory(n, d, full).factory.endswith(",RFlat")
    assert choose_factory(n, d, full - 1).factory.endswith(",Refine(SQfp16)")
    assert choose_factory(n, d, fp16 - 1).factory.endswith(",Refine(SQ8)")
    choice = choose_factory(n, d, 100 * 10**6)
    assert "PQ" in choice.factory and "fs" not in choice.factory and choice.factory.startswith(("IVF4096,", "OPQ"))
    assert choice.estimated_bytes <= 100 * 10**6
    for text in ("1.2M vectors", "512-d", "2.46 GB", "budget 100 MB", "Refine(SQ8) ~", "exceed the budget"):
        assert text in choice.reason


def test_the_default_budget_is_half_the_ram_and_the_reason_says_so():
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert default_memory_budget() == ram // 2
    choice = choose_factory(1_000_000, 512, default_memory_budget(), budget_note="the default: half of this RAM")
    assert "(the default: half of this RAM)" in choice.reason


def test_an_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fit in budget 1 kB"):
        choose_factory(100_000, 128, 1000)


@pytest.mark.parametrize(
    ("n", "d", "budget"), [(3000, 32, None), (60_000, 32, None), (60_000, 32, 3 * 10**6), (60_000, 36, 10**6)]
)
def test_chosen_factories_are_valid_faiss_strings(n, d, budget):
    choice = choose_factory(n, d, budget)
    index = FaissIndex(d, choice.factory, device="cpu")
    assert index.nlist == choice.nlist
    assert budget is None or estimate_index_bytes(choice.factory, n, d) <= budget


def test_nlist_and_training_sample_sizes_follow_faiss_guidance():
    assert ivf_nlist(1_000_000) == 4096 and ivf_nlist(10_000_000) == 65536
    assert ivf_nlist(1000) <= 1000 // 39
    assert training_sample_size("Flat", 10**6) == training_sample_size("HNSW32", 10**6) == 0
    assert training_sample_size("IVF4096,Flat", 10**7) == 64 * 4096  # >= 39 per centroid, <= 256
    assert training_sample_size("IVF64,PQ8", 10**7) == 256 * 256  # PQ codebooks dominate
    assert training_sample_size("IVF4096,PQ64", 1000) == 1000  # never more than there is


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a visible GPU")
def test_gpu_build_is_stored_on_cpu(data, tmp_path):  # pragma: no cover - runs only where a GPU exists
    gallery, queries, ids = data
    index = FaissIndex(DIM, "IVF64,Flat", device="gpu")
    index.train(gallery)
    index.add(gallery, ids)
    assert index.on_gpu and index.supports_range_search  # range search runs on the CPU copy
    gpu_result = index.search(queries, 10, SearchParams(nprobe=64))
    index.save(tmp_path / "gpu.faiss")
    cpu = FaissIndex.load(tmp_path / "gpu.faiss", factory="IVF64,Flat", device="cpu")
    _, truth = _brute_force(gallery, queries, 10)
    assert recall_at_k(gpu_result[1], ids[truth]) > 0.99
    assert recall_at_k(cpu.search(queries, 10, SearchParams(nprobe=64))[1], ids[truth]) > 0.99
    native, knn = (index.range_search(queries[:5], 0.4, SearchParams(nprobe=64), method=m) for m in ("auto", "knn"))
    assert not native.fallback and knn.fallback  # "knn" keeps the query on the GPU
    np.testing.assert_array_equal(native.lims, knn.lims)
