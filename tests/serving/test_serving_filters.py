"""Label filters (``where``) through every way into a search: the index directory, the engine, the HTTP API
(a real uvicorn server on 127.0.0.1, both endpoints, through the micro-batcher) and ``retrieval search``.

The index holds seeded random unit vectors with labels at three levels, under the tiny checkpoint's encoder
id, so uploads are embedded by a real encoder; every filtered answer is checked against a brute-force
search over the matching items only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from indexing.errors import UnknownLevelError
from indexing.faiss_index import FaissIndex
from indexing.index_dir import open_index_dir, write_index_dir
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow
from indexing.vector_index import LabelFilter
from retrieval.data.images import decode_image_bytes
from serving.api.server import running_server
from serving.app import create_app
from serving.engine import SearchEngine
from serving.settings import ServeSettings

DIM = 32  # the tiny checkpoint's embedding size
COUNT = 240
LEVELS = ["fine", "middle", "coarse"]
runner = CliRunner()


def _labels(i: int) -> dict[str, str]:
    """Independent levels, so that filters on two of them intersect into a proper subset of each."""
    return {"fine": f"f{i % 7}", "middle": f"m{(i // 2) % 3}", "coarse": "shoes" if i % 2 == 0 else "shirts"}


def _ids(i: np.ndarray) -> np.ndarray:
    return 5 * i + 3  # ids that are not row positions: filtering must go by id


@pytest.fixture(scope="module")
def gallery_vectors() -> np.ndarray:
    x = np.random.default_rng(11).standard_normal((COUNT, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def labelled_index(tiny_checkpoint, gallery_vectors, tmp_path_factory) -> Path:
    """A FAISS index directory of the random vectors, claimed by the tiny checkpoint (its default query encoder)."""
    from models import read_checkpoint_info

    path = tmp_path_factory.mktemp("filters") / "index"
    index = FaissIndex(DIM)
    index.add(gallery_vectors, _ids(np.arange(COUNT)))
    rows = (MetadataRow(id=int(_ids(i)), path=f"g/{i}.png", labels=_labels(i)) for i in range(COUNT))
    manifest = Manifest(
        dim=DIM,
        count=COUNT,
        encoder_id=read_checkpoint_info(tiny_checkpoint).encoder_id,
        encoder_path=str(tiny_checkpoint),
        levels=LEVELS,
    )
    return write_index_dir(path, index, rows, manifest)


def _mask(filters: list[LabelFilter]) -> np.ndarray:
    return np.array([all(_labels(i)[f.level] in f.values for f in filters) for i in range(COUNT)])


def _brute_force(vectors: np.ndarray, query: np.ndarray, filters: list[LabelFilter], k: int) -> tuple[list, list]:
    """Ids and scores of the best ``k`` matching items by a full scan over the matching rows only."""
    rows = np.flatnonzero(_mask(filters))
    scores = vectors[rows] @ query
    best = np.argsort(-scores, kind="stable")[:k]
    return _ids(rows[best]).tolist(), scores[best].tolist()


def _queries(n: int, seed: int = 5) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


FILTER_CASES = [
    [LabelFilter("coarse", ("shoes",))],
    [LabelFilter("middle", ("m0", "m2"))],
    [LabelFilter("coarse", ("shirts",)), LabelFilter("middle", ("m1",))],  # two filters: their intersection
    [LabelFilter("fine", ("f3",)), LabelFilter("coarse", ("shoes",)), LabelFilter("middle", ("m0", "m1"))],
]


@pytest.mark.parametrize("filters", FILTER_CASES, ids=lambda f: "&".join(map(str, f)))
def test_index_directory_filter_is_brute_force_over_the_matching_items(labelled_index, gallery_vectors, filters):
    queries = _queries(4)
    matching = int(_mask(filters).sum())
    assert 0 < matching < COUNT
    with open_index_dir(labelled_index) as directory:
        where = filters[0] if len(filters) == 1 else filters
        results = directory.search(queries, 10, where=where)
        above, _ = directory.search_above(queries, 0.1, where=where)
    for query, found, ranged in zip(queries, results, above, strict=True):
        ids, scores = _brute_force(gallery_vectors, query, filters, 10)
        assert [hit.id for hit in found.hits] == ids
        np.testing.assert_allclose([hit.score for hit in found.hits], scores, atol=1e-5)
        every_id, every_score = _brute_force(gallery_vectors, query, filters, COUNT)
        assert [hit.id for hit in ranged.hits] == [i for i, s in zip(every_id, every_score, strict=True) if s > 0.1]
        for hit in (*found.hits, *ranged.hits):
            assert all(hit.labels[f.level] in f.values for f in filters)


def test_two_filters_intersect_and_a_filter_on_an_unknown_level_is_refused(labelled_index):
    queries = _queries(2)
    shoes, m1 = LabelFilter("coarse", ("shoes",)), LabelFilter("middle", ("m1",))
    with open_index_dir(labelled_index) as directory:
        both = directory.search(queries, COUNT, where=[shoes, m1])
        alone = [directory.search(queries, COUNT, where=one) for one in (shoes, m1)]
        for i in range(len(queries)):
            expected = {h.id for h in alone[0][i].hits} & {h.id for h in alone[1][i].hits}
            assert {h.id for h in both[i].hits} == expected and len(expected) == int(_mask([shoes, m1]).sum())
        with pytest.raises(UnknownLevelError, match=r"'colour'.*fine, middle, coarse"):
            directory.search(queries, 3, where=LabelFilter("colour", ("red",)))


def test_engine_searches_embeddings_with_a_filter_and_describes_its_backend(labelled_index, gallery_vectors):
    queries = _queries(3, seed=8)
    filters = [LabelFilter("coarse", ("shirts",)), LabelFilter("fine", ("f1", "f2", "f4"))]
    with SearchEngine.open(labelled_index, backend_options={}) as engine:
        results = engine.search_embeddings(queries, 6, where=filters)
        (single,) = engine.search_embeddings(queries[:1], 6, where=filters[0])
        above, _ = engine.search_embeddings_above(queries, 0.2, limit=4, where=filters)
        for query, found, ranged in zip(queries, results, above, strict=True):
            assert [h.id for h in found.hits] == _brute_force(gallery_vectors, query, filters, 6)[0]
            ids, scores = _brute_force(gallery_vectors, query, filters, 4)
            assert [h.id for h in ranged.hits] == [i for i, s in zip(ids, scores, strict=True) if s > 0.2]
        assert [h.id for h in single.hits] == _brute_force(gallery_vectors, queries[0], filters[:1], 6)[0]
        with pytest.raises(UnknownLevelError) as err:
            engine.search_embeddings(queries, 3, where=LabelFilter("size", ("42",)))
        description = engine.describe()
    assert str(labelled_index) not in str(err.value) and "fine, middle, coarse" in str(err.value)
    assert description["backend"] == "faiss" and description["levels"] == LEVELS


@pytest.fixture(scope="module")
def server(labelled_index) -> Iterator[tuple[str, object]]:
    """The real server, batching uploads (up to 8, waiting 100 ms for company) so differently filtered queries
    share encoder calls."""
    settings = ServeSettings(index=labelled_index, max_k=50, batch_max_size=8, batch_max_wait_ms=100)
    app = create_app(settings)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def _upload(serving_gallery: Path, i: int) -> bytes:
    return (serving_gallery.parent / f"img_{i}.png").read_bytes()


def test_image_search_with_filters_matches_brute_force_even_when_batched(
    client, server, serving_gallery, gallery_vectors
):
    engine = server[1].state.engine
    cases = [
        (["coarse=shoes"], [LabelFilter("coarse", ("shoes",))]),
        (["middle=m0,m2"], [LabelFilter("middle", ("m0", "m2"))]),
        (["coarse=shirts", "middle=m1"], [LabelFilter("coarse", ("shirts",)), LabelFilter("middle", ("m1",))]),
        ([], []),
    ]
    jobs = [(i, *cases[i % len(cases)]) for i in range(8)]

    def post(job):
        i, where, _ = job
        files = {"image": ("q.png", _upload(serving_gallery, i), "image/png")}
        return client.post("/v1/search", files=files, data={"k": "7", "where": where})

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(post, jobs))
    for (i, _, filters), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["where"] == ({f.level: list(f.values) for f in filters} or None)
        query = engine.embed([decode_image_bytes(_upload(serving_gallery, i), "q.png")])[0]
        ids, scores = _brute_force(gallery_vectors, query, filters, 7)
        assert [hit["id"] for hit in body["hits"]] == ids
        np.testing.assert_allclose([hit["score"] for hit in body["hits"]], scores, atol=1e-4)
    metrics = client.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('retrieval_query_batch_size_bucket{le="1.0"}')]
    count = [line for line in metrics.splitlines() if line.startswith("retrieval_query_batch_size_count")]
    assert float(sizes[0].split()[-1]) < float(count[0].split()[-1]), "no batch mixed differently filtered queries"


def test_image_search_refuses_bad_and_unknown_filters_before_reading_the_upload(client, serving_gallery):
    files = {"image": ("q.png", _upload(serving_gallery, 0), "image/png")}
    for where, message in [
        ("coarse", "LEVEL=VALUE"),
        ("coarse=", "at least one value"),
        ("=shoes", "needs a level"),
        (["coarse=shoes", "coarse=shirts"], "given twice"),
    ]:
        response = client.post("/v1/search", files=files, data={"where": where})
        assert response.status_code == 422 and message in response.json()["detail"], (where, response.text)
    unknown = client.post("/v1/search", files={"image": ("q.png", b"not an image", "image/png")}, data={"where": "x=1"})
    assert unknown.status_code == 422  # the filter is refused first: the bad upload is never decoded (400)
    assert unknown.json()["detail"] == "cannot filter on label level 'x'; this index has fine, middle, coarse"


def test_embedding_search_with_a_filter_and_its_errors(client, server, gallery_vectors):
    engine = server[1].state.engine
    query = _queries(1, seed=21)[0]

    def post(**body):
        return client.post(
            "/v1/search/embedding", json={"embedding": query.tolist(), "encoder_id": engine.encoder_id, **body}
        )

    response = post(k=5, where={"middle": ["m2"], "coarse": ["shoes"]})
    assert response.status_code == 200, response.text
    body = response.json()
    filters = [LabelFilter("middle", ("m2",)), LabelFilter("coarse", ("shoes",))]
    assert body["where"] == {"middle": ["m2"], "coarse": ["shoes"]}
    assert [hit["id"] for hit in body["hits"]] == _brute_force(gallery_vectors, query, filters, 5)[0]
    ranged = post(min_score=0.0, where={"fine": ["f0", "f5"]}).json()
    every_id, every_score = _brute_force(gallery_vectors, query, [LabelFilter("fine", ("f0", "f5"))], COUNT)
    assert [h["id"] for h in ranged["hits"]] == [i for i, s in zip(every_id, every_score, strict=True) if s > 0][:50]
    assert post(k=5).json()["where"] is None
    for bad in ({"coarse": []}, {"coarse": "shoes"}, {"coarse": [""]}, ["coarse=shoes"]):
        assert post(where=bad).status_code == 422, bad
    unknown = post(where={"colour": ["red"]})
    assert unknown.status_code == 422 and "fine, middle, coarse" in unknown.json()["detail"]
    assert client.get("/v1/index").json()["backend"] == "faiss"


def test_serve_settings_check_the_backend_against_the_index(labelled_index, monkeypatch):
    assert ServeSettings(index=labelled_index, backend="faiss").backend_options() == {}
    with pytest.raises(ValidationError, match="lives in the faiss backend, not qdrant"):
        ServeSettings(index=labelled_index, backend="qdrant")
    with pytest.raises(ValidationError, match="applies to Qdrant indexes"):
        ServeSettings(index=labelled_index, qdrant_url="http://qdrant:6333")
    monkeypatch.setenv("RETRIEVAL_BACKEND", "qdrant")
    with pytest.raises(ValidationError, match="not qdrant"):
        ServeSettings(index=labelled_index)
    monkeypatch.setenv("RETRIEVAL_QDRANT_URL", "http://qdrant:6333")
    settings = ServeSettings(index=labelled_index.parent / "not-built-yet")  # no manifest to check against
    assert settings.backend == "qdrant" and settings.backend_options() == {"url": "http://qdrant:6333"}


def test_cli_search_where_prints_only_matching_hits(labelled_index, serving_gallery, gallery_vectors):
    from retrieval.cli.main import app

    image = serving_gallery.parent / "img_4.png"
    args = ["search", "--index", str(labelled_index), str(image), "--k", "6", "--json"]
    result = runner.invoke(app, [*args, "--where", "coarse=shirts", "--where", "fine=f1,f3", "--backend", "faiss"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    filters = [LabelFilter("coarse", ("shirts",)), LabelFilter("fine", ("f1", "f3"))]
    assert payload["where"] == {"coarse": ["shirts"], "fine": ["f1", "f3"]}
    hits = payload["results"][0]["hits"]
    with SearchEngine.open(labelled_index) as engine:
        query = engine.embed([decode_image_bytes(image.read_bytes(), image.name)])[0]
    assert [hit["id"] for hit in hits] == _brute_force(gallery_vectors, query, filters, 6)[0]
    assert all(hit["labels"]["coarse"] == "shirts" and hit["labels"]["fine"] in ("f1", "f3") for hit in hits)
    for extra, message in [
        (["--where", "coarse"], "LEVEL=VALUE"),
        (["--where", "colour=red"], "cannot filter on label level 'colour'"),
        (["--backend", "qdrant"], "lives in the faiss backend"),
        (["--qdrant-url", "http://qdrant:6333"], "applies to Qdrant indexes"),
    ]:
        failed = runner.invoke(app, [*args, *extra])
        assert failed.exit_code == 2 and message in failed.output, (extra, failed.output)
