"""QdrantIndex in local mode (a directory) and in memory: the same hits as brute force and FAISS, filters,
range search, removal, the alias/physical publish scheme, and refusal of bad input."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from indexing.faiss_index import FaissIndex
from indexing.manifest import Manifest
from indexing.qdrant_connection import QdrantConnectionError, QdrantLocation, QdrantNotInstalledError, close_client
from indexing.qdrant_index import QdrantIndex
from indexing.vector_index import NO_ID, LabelFilter, SearchParams, backend_class
from retrieval.config import ConfigError

N, D, K = 500, 32, 10
SMALL = 120
COARSE = ("shoes", "bags", "hats")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10**9, size=N, replace=False)).astype(np.int64)
    ids[-1] = 2**62  # a large id survives the unsigned point ids
    return {
        "gallery": _unit(rng, N, D),
        "queries": _unit(rng, 20, D),
        "ids": ids,
        "coarse": np.array([COARSE[i % 3] for i in range(N)]),
        "fine": np.array([f"f{i % 17}" for i in range(N)]),
    }


def _location(kind: str, tmp_path: Path) -> str:
    return ":memory:" if kind == "memory" else str(tmp_path / "qdrant")


def _create(dim: int, url: str, collection: str, **options) -> QdrantIndex:
    return QdrantIndex.create(dim, "auto", {"url": url, "collection": collection, **options})


@pytest.fixture(scope="module", params=["memory", "path"])
def index(request, tmp_path_factory, data):
    """The gallery in each local kind of store, built once per module (local mode commits every point to SQLite
    on its own, ~10 ms each here); tests that change it build their own."""
    built = _create(D, _location(request.param, tmp_path_factory.mktemp("q")), "gallery")
    labels = [{"coarse": c, "fine": f} for c, f in zip(data["coarse"], data["fine"], strict=True)]
    built.add(data["gallery"][:300], data["ids"][:300], labels=labels[:300])
    built.add(data["gallery"][300:], data["ids"][300:], labels=labels[300:])  # a second add keeps both
    yield built
    built.discard()
    built.close()


@pytest.fixture(params=["memory", "path"])
def small_index(request, tmp_path, data):
    """The first ``SMALL`` gallery items in a fresh store, for tests that change the index."""
    built = _create(D, _location(request.param, tmp_path), "gallery")
    built.add(data["gallery"][:SMALL], data["ids"][:SMALL])
    yield built
    built.discard()
    built.close()


def _brute_force(data, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
    sims = queries.astype(np.float64) @ data["gallery"].astype(np.float64).T
    if mask is not None:
        sims[:, ~mask] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(sims, order, axis=1)
    return scores, np.where(np.isfinite(scores), data["ids"][order], NO_ID)


# ---------------------------------------------------------------------------------------------- locations


def test_location_syntax_is_parsed_and_canonical(tmp_path):
    assert QdrantLocation.parse(":memory:") == QdrantLocation("memory", ":memory:")
    local = QdrantLocation.parse(f"{tmp_path}/a/../store")
    assert local == QdrantLocation("path", f"{tmp_path.resolve()}/store") and local.is_local
    assert QdrantLocation.parse(f"path:{tmp_path}/store") == local  # the explicit form of the same directory
    assert QdrantLocation.parse("path:localhost:6333").url == str(Path("localhost:6333").resolve())
    server = QdrantLocation.parse("https://user:secret@qdrant.example.com:6333/")
    assert server == QdrantLocation("server", "https://qdrant.example.com:6333")  # credentials never recorded
    assert not server.is_local
    with pytest.raises(ValueError, match=r"did you mean http://localhost:6333"):
        QdrantLocation.parse("localhost:6333")
    for bad in ("", "  ", "grpc://host:6334", "path:"):
        with pytest.raises(ValueError, match=r"http\(s\)://HOST:PORT, :memory: or a directory|needs a directory"):
            QdrantLocation.parse(bad)


def test_registered_as_qdrant_backend():
    assert backend_class("qdrant") is QdrantIndex
    assert QdrantIndex.stores_labels and QdrantIndex.writes_in_place and QdrantIndex.files == ()


def test_unreachable_server_is_a_clear_connection_error():
    with pytest.raises(QdrantConnectionError, match=r"cannot reach Qdrant at http://127\.0\.0\.1:1"):
        _create(8, "http://127.0.0.1:1", "gallery")


def test_missing_qdrant_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # what `import qdrant_client` sees when absent
    with pytest.raises(QdrantNotInstalledError, match=r'pip install "retrieval-engine\[qdrant\]"'):
        _create(8, ":memory:", "gallery")


# ---------------------------------------------------------------------------------------------- search


def test_search_equals_brute_force_and_faiss_flat(index, data):
    scores, ids = index.search(data["queries"], K)
    assert scores.shape == ids.shape == (20, K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref_scores, ref_ids = _brute_force(data, data["queries"], K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    flat = FaissIndex(D, "Flat")
    flat.add(data["gallery"], data["ids"])
    flat_scores, flat_ids = flat.search(data["queries"], K)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(scores, flat_scores, atol=1e-5)
    single_scores, single_ids = index.search(data["queries"][:1], K)  # the one-query path
    np.testing.assert_array_equal(single_ids, ids[:1])
    np.testing.assert_allclose(single_scores, scores[:1], atol=1e-6)


def test_scores_are_inner_products_for_non_unit_queries(index, data):
    queries = data["queries"][:3] * np.array([[0.5], [2.0], [3.0]], np.float32)
    scores, ids = index.search(queries, K)
    ref_scores, ref_ids = _brute_force(data, queries, K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_k_is_clipped_to_the_collection_size(index, data):
    _, ids = index.search(data["queries"][:2], N + 50)
    assert ids.shape == (2, N) and not (ids == NO_ID).any()
    assert set(ids[0].tolist()) == set(data["ids"].tolist())
    _, huge = index.search(data["queries"][:2], 10**6)  # counted before asking, not sent as a limit
    np.testing.assert_array_equal(huge, ids)


def test_where_filter_equals_brute_force_over_the_subset(index, data):
    where = LabelFilter("coarse", ("shoes", "hats"))
    scores, ids = index.search(data["queries"], K, where=where)
    mask = np.isin(data["coarse"], where.values)
    ref_scores, ref_ids = _brute_force(data, data["queries"], K, mask)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # a level without a payload index (fine) filters all the same; fewer matches than k leave NO_ID slots
    rare = LabelFilter("fine", ("f3",))
    scores, ids = index.search(data["queries"][:2], 40, where=rare)
    matches = int((data["fine"] == "f3").sum())
    assert matches < 40
    ref_scores, ref_ids = _brute_force(data, data["queries"][:2], 40, data["fine"] == "f3")
    np.testing.assert_array_equal(ids, ref_ids)
    assert (ids[:, matches:] == NO_ID).all() and (scores[:, matches:] == np.finfo(np.float32).min).all()
    np.testing.assert_allclose(scores[:, :matches], ref_scores[:, :matches], atol=1e-5)


def test_allowed_ids_restrict_the_candidates(index, data):
    rng = np.random.default_rng(3)
    allowed_rows = rng.choice(N, size=60, replace=False)
    mask = np.zeros(N, bool)
    mask[allowed_rows] = True
    scores, ids = index.search(data["queries"], K, allowed_ids=data["ids"][allowed_rows])
    ref_scores, ref_ids = _brute_force(data, data["queries"], K, mask)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # with a label filter too: the intersection
    where = LabelFilter("coarse", ("bags",))
    _, ids = index.search(data["queries"], K, where=where, allowed_ids=data["ids"][allowed_rows])
    _, ref_ids = _brute_force(data, data["queries"], K, mask & (data["coarse"] == "bags"))
    np.testing.assert_array_equal(ids, ref_ids)
    # nothing allowed (or only ids that cannot be stored): every slot empty
    for nothing in (np.zeros(0, np.int64), np.array([-5, NO_ID])):
        _, ids = index.search(data["queries"][:2], K, allowed_ids=nothing)
        assert ids.shape == (2, K) and (ids == NO_ID).all()


def test_range_search_equals_brute_force_strictly_above_threshold(index, data):
    queries = data["queries"][:6]
    sims = queries.astype(np.float64) @ data["gallery"].astype(np.float64).T
    # a threshold in the middle of a gap of the score distribution, so rounding cannot decide a hit
    values = np.sort(sims.ravel())
    gaps = np.diff(values)
    low_region = np.flatnonzero((values[:-1] > 0.05) & (values[:-1] < 0.15))
    at = low_region[np.argmax(gaps[low_region])]
    threshold = float((values[at] + values[at + 1]) / 2)
    result = index.range_search(queries, threshold)
    assert len(result) == 6 and not result.fallback
    assert (np.diff(result.lims) > 64).all()  # more hits than the first limit: the growing limit is exercised
    for row in range(6):
        scores, ids = result.hits(row)
        expected = np.flatnonzero(sims[row] > threshold)
        expected = expected[np.argsort(-sims[row, expected], kind="stable")]
        np.testing.assert_array_equal(ids, data["ids"][expected])
        np.testing.assert_allclose(scores, sims[row, expected], atol=1e-5)
    filtered = index.range_search(queries, threshold, where=LabelFilter("coarse", ("bags",)))
    for row in range(6):
        _, ids = filtered.hits(row)
        expected = np.flatnonzero((sims[row] > threshold) & (data["coarse"] == "bags"))
        assert set(ids.tolist()) == set(data["ids"][expected].tolist())
    # a threshold equal to a stored score excludes that item (strictly above)
    exact_score = float(np.float32(sims[0].max()))
    _, ids = index.range_search(queries[:1], exact_score + 1e-4).hits(0)
    assert ids.size == 0


def test_ids_and_ntotal(index, data):
    assert index.ntotal == len(index) == N and index.dim == D
    np.testing.assert_array_equal(np.sort(index.ids()), np.sort(data["ids"]))


def test_remove_deletes_and_counts(small_index, data):
    gone = data["ids"][:40]
    assert small_index.remove(np.concatenate([gone, [-3, 7_777_777_777]])) == 40  # absent and negative ignored
    assert small_index.remove(gone) == 0
    assert small_index.ntotal == SMALL - 40
    np.testing.assert_array_equal(np.sort(small_index.ids()), np.sort(data["ids"][40:SMALL]))
    _, ids = small_index.search(data["gallery"][:40], 5)
    assert not np.isin(ids, gone).any()
    keep = np.zeros(N, bool)
    keep[40:SMALL] = True
    _, ref_ids = _brute_force(data, data["queries"], K, keep)
    np.testing.assert_array_equal(small_index.search(data["queries"], K)[1], ref_ids)


def test_ef_search_is_the_only_search_parameter(index, data):
    index.set_default_params(SearchParams(ef_search=64))
    try:
        assert index.default_params == SearchParams(ef_search=64)
        _, ids = index.search(data["queries"], K, SearchParams(ef_search=128))  # local mode: exact whatever ef
        np.testing.assert_array_equal(ids, _brute_force(data, data["queries"], K)[1])
        with pytest.raises(ValueError, match="only ef_search"):
            index.search(data["queries"], K, SearchParams(nprobe=8))
        with pytest.raises(ValueError, match="only ef_search"):
            index.set_default_params(SearchParams(k_factor=4))
    finally:
        index.set_default_params(SearchParams())
    assert index.default_params == SearchParams()


# ---------------------------------------------------------------------------------------------- validation


def test_bad_input_is_refused(index, data):
    vectors, rng = data["gallery"][:2], np.random.default_rng(5)
    fresh = np.array([10**12, 10**12 + 1])
    with pytest.raises(ValueError, match="unsigned"):
        index.add(vectors, np.array([10**12, -1]))
    with pytest.raises(ValueError, match="unique"):
        index.add(vectors, np.array([10**12, 10**12]))
    with pytest.raises(ValueError, match=rf"already in the index: \[{data['ids'][0]}\]"):
        index.add(vectors, np.array([data["ids"][0], 10**12]))
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(vectors * 1.01, fresh)
    with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
        index.add(_unit(rng, 2, 16), fresh)
    with pytest.raises(ValueError, match=r"ids must have shape \(2,\)"):
        index.add(vectors, fresh[:1])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((2, D), np.nan, np.float32), fresh)
    with pytest.raises(ValueError, match="one mapping per vector"):
        index.add(vectors, fresh, labels=[{"coarse": "shoes"}])
    with pytest.raises(ValueError, match="map level names to strings"):
        index.add(vectors, fresh, labels=[{"coarse": 1}, {"coarse": "x"}])
    assert index.ntotal == N  # nothing above was stored
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(data["queries"], k)
    with pytest.raises(ValueError, match="non-zero"):
        index.search(np.zeros((1, D), np.float32), K)
    with pytest.raises(ValueError, match="finite"):
        index.range_search(data["queries"], float("nan"))


def test_create_takes_only_its_own_factory_and_options():
    with pytest.raises(ConfigError, match="leave --factory at auto"):
        QdrantIndex.create(8, "HNSW32", {"url": ":memory:", "collection": "a"})
    with pytest.raises(ConfigError, match=r"url, collection and optionally exact; got \['collection'\]"):
        QdrantIndex.create(8, "auto", {"collection": "a"})
    with pytest.raises(ConfigError, match=r"got \['collection', 'nprobe', 'url'\]"):
        QdrantIndex.create(8, "qdrant", {"url": ":memory:", "collection": "a", "nprobe": 4})
    with pytest.raises(ConfigError, match="exact must be true or false"):
        QdrantIndex.create(8, "auto", {"url": ":memory:", "collection": "a", "exact": "yes"})
    with pytest.raises(ConfigError, match="did you mean http://qdrant:6333"):
        QdrantIndex.create(8, "auto", {"url": "qdrant:6333", "collection": "a"})
    index = QdrantIndex.create(8, "qdrant", {"url": ":memory:", "collection": "a"})
    assert index.factory == "qdrant" and index.dim == 8 and index.ntotal == 0
    scores, ids = index.search(np.ones((3, 8), np.float32), 5)  # an empty collection: no slots at all
    assert scores.shape == ids.shape == (3, 0)
    assert len(index.range_search(np.ones((3, 8), np.float32), 0.0)) == 3
    index.discard()
    index.close()


def test_bad_names_and_dimensions_are_refused(tmp_path):
    for name in ("", "-lead", "a/b", "x" * 201, "spa ce"):
        with pytest.raises(ValueError, match="collection name"):
            _create(8, ":memory:", name)
    taken = _create(8, str(tmp_path / "q"), "shop")
    with pytest.raises(ValueError, match=rf"collection named '{taken.physical}' already exists"):
        _create(8, str(tmp_path / "q"), taken.physical)  # an alias cannot take its name
    taken.publish(None)
    _create(8, str(tmp_path / "q"), "shop").close()  # an existing alias is fine
    taken.close()
    for dim in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            _create(dim, ":memory:", "gallery")


# ---------------------------------------------------------------------------------------------- persistence


def _manifest(options: dict, dim: int = D, count: int = N) -> Manifest:
    return Manifest(dim=dim, count=count, encoder_id="x", backend="qdrant", backend_options=options)


def _open(directory: Path, options: dict, dim: int = D) -> QdrantIndex:
    return QdrantIndex.open(directory, _manifest(options, dim=dim))


@pytest.mark.parametrize("kind", ["memory", "path"])
def test_write_publish_open_round_trip_and_republish(kind, tmp_path, data):
    url = _location(kind, tmp_path)
    first = _create(D, url, "shop")
    first.add(data["gallery"][:SMALL], data["ids"][:SMALL])
    options = first.write_to(tmp_path / "index")
    assert options == {"url": QdrantLocation.parse(url).url, "collection": "shop", "physical": first.physical}
    assert first.physical.startswith("shop-") and len(first.physical) == len("shop-") + 8
    assert not (tmp_path / "index").exists()  # nothing written: the vectors live in Qdrant
    first.publish(None)
    assert first.alias_target() == first.physical

    reopened = _open(tmp_path / "index", options)
    assert reopened.ntotal == SMALL and reopened.physical == first.physical
    np.testing.assert_array_equal(reopened.search(data["queries"], K)[1], first.search(data["queries"], K)[1])
    described = reopened.describe()
    assert described["backend"] == "qdrant" and described["ntotal"] == SMALL and described["status"] == "green"
    assert (described["url"], described["collection"], described["physical"]) == (
        options["url"],
        "shop",
        first.physical,
    )
    reopened.close()

    second = _create(D, url, "shop")
    second.add(data["gallery"][:30], data["ids"][:30])
    new_options = second.write_to(tmp_path / "index2")
    second.publish(_manifest(options))
    assert second.alias_target() == second.physical  # the alias moved
    with pytest.raises(ValueError, match=rf"{first.physical}.*does not exist at {options['url']}"):
        _open(tmp_path / "index", options)  # the previous physical collection was dropped
    again = _open(tmp_path / "index2", new_options)
    assert again.ntotal == 30
    again.publish(_manifest(new_options))  # publishing over itself keeps its collection
    assert again.alias_target() == second.physical and again.ntotal == 30
    for opened in (first, second, again):
        opened.discard()
        opened.close()


def test_publish_drops_only_the_previous_directorys_collection(tmp_path, data):
    url = str(tmp_path / "q")
    bystander = _create(D, url, "shop")  # the alias names it, but no previous manifest does
    bystander.publish(Manifest(dim=D, count=0, encoder_id="x"))  # over a FAISS directory: nothing to drop
    elsewhere = {"url": ":memory:", "collection": "shop", "physical": bystander.physical}
    new = _create(D, url, "shop")
    new.publish(_manifest(elsewhere))  # the previous manifest's collection is at another location: kept
    assert new.alias_target() == new.physical
    kept = QdrantIndex.connect(bystander.write_to(tmp_path))  # still there, still readable
    assert kept.ntotal == 0
    for index in (bystander, new, kept):
        index.discard()
        index.close()


def test_discard_drops_the_physical_collection(tmp_path, data):
    index = _create(D, str(tmp_path / "q"), "shop")
    index.add(data["gallery"][:10], data["ids"][:10])
    options = index.write_to(tmp_path / "index")
    index.discard()
    index.close()
    with pytest.raises(ValueError, match="does not exist"):
        QdrantIndex.connect(options)


def test_discard_never_drops_a_collection_it_only_opened(tmp_path, data):
    """``index add`` opens the live collection: a failed write there must not delete the index."""
    index = _create(D, str(tmp_path / "q"), "shop")
    index.add(data["gallery"][:10], data["ids"][:10])
    options = index.write_to(tmp_path / "index")
    opened = QdrantIndex.connect(options)
    opened.discard()
    opened.close()
    assert QdrantIndex.connect(options).ntotal == 10
    index.discard()
    index.close()


def test_open_checks_the_manifest_dimension(tmp_path, data):
    index = _create(D, ":memory:", "shop")
    options = index.write_to(tmp_path)
    with pytest.raises(ValueError, match="holds 32-d vectors"):
        QdrantIndex.open(tmp_path, _manifest(options, dim=64))
    with pytest.raises(ValueError, match="names no Qdrant collection"):
        QdrantIndex.open(tmp_path, Manifest(dim=D, count=0, encoder_id="x"))
    index.discard()
    index.close()


def test_bad_backend_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['physical'\]"):
        QdrantIndex.connect({"url": ":memory:", "collection": "a"})
    with pytest.raises(ValueError, match=r"unknown \['factory'\]"):
        QdrantIndex.connect({"url": ":memory:", "collection": "a", "physical": "a-1", "factory": "Flat"})
    with pytest.raises(ValueError, match="physical collection must be"):
        QdrantIndex.connect({"url": ":memory:", "collection": "a", "physical": "../etc"})
    with pytest.raises(ValueError, match=r"local Qdrant store .*nowhere does not exist"):
        QdrantIndex.connect({"url": str(tmp_path / "nowhere"), "collection": "a", "physical": "a-1"})
    assert not (tmp_path / "nowhere").exists()  # opening does not create an empty store


def test_local_store_is_shared_in_process_and_read_back_from_disk(tmp_path, data):
    url = str(tmp_path / "q")
    writer = _create(D, url, "shop", exact=True)
    writer.add(data["gallery"][:50], data["ids"][:50], labels=[{"coarse": c} for c in data["coarse"][:50]])
    options = writer.write_to(tmp_path)
    assert options["exact"] is True and options["url"] == str((tmp_path / "q").resolve())
    reader = QdrantIndex.connect(options)  # same directory, same process: the cached client, no lock conflict
    assert reader.client is writer.client
    writer.close()
    assert reader.ntotal == 50  # closing one index leaves the shared client open for the others
    with pytest.raises(RuntimeError, match="closed"):
        writer.search(data["queries"], K)
    with pytest.raises(ValueError, match="still use"):
        close_client(url)  # the reader is open
    reader.close()
    assert close_client(url) and not close_client(url)  # closed once: the directory lock is released
    reopened = QdrantIndex.connect(options)  # a fresh client reads the store back from disk
    mask = np.zeros(N, bool)
    mask[:50] = True
    _, ids = reopened.search(data["queries"], K, where=LabelFilter("coarse", ("shoes",)))
    _, ref_ids = _brute_force(data, data["queries"], K, mask & (data["coarse"] == "shoes"))
    np.testing.assert_array_equal(ids, ref_ids)
    reopened.discard()
    reopened.close()


def test_concurrent_searches_on_a_local_store_match_serial_ones(index, data):
    expected = index.search(data["queries"], K)[1]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        results[i] = index.search(data["queries"][i : i + 1], K)[1][0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(data["queries"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(np.stack([results[i] for i in range(len(threads))]), expected)
