"""Every endpoint of the HTTP API through a real uvicorn server on 127.0.0.1: auth, CORS, the embedding
search, metrics, readiness, offline docs, micro-batching under concurrent load, and error bodies."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from retrieval.data.datasets import CsvImageDataset
from retrieval.data.images import decode_image_bytes
from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings

KEY = "k3y-for-tests"
ORIGIN = "https://page.example"
MAX_K = 20


@pytest.fixture(scope="module")
def gallery(serving_gallery) -> CsvImageDataset:
    return CsvImageDataset(serving_gallery)


def _png(gallery: CsvImageDataset, i: int) -> bytes:
    return Path(gallery.paths[i]).read_bytes()


@pytest.fixture(scope="module")
def secured(serving_index, serving_onnx) -> Iterator[tuple[str, object]]:
    """A server with an ONNX query encoder, an API key, CORS for one origin and a 5 ms batching window."""
    settings = ServeSettings(
        index=serving_index,
        query_encoder=serving_onnx,
        api_key=KEY,
        cors_origins=[ORIGIN],
        default_k=3,
        max_k=MAX_K,
        batch_max_size=16,
        batch_max_wait_ms=5,
    )
    app = create_app(settings)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(secured) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured[0], timeout=30, headers={"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def anonymous(secured) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured[0], timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def open_server(serving_index) -> Iterator[str]:
    """No key, no CORS, no batching, the torch checkpoint that built the index."""
    settings = ServeSettings(index=serving_index, default_k=3, max_k=MAX_K, max_upload_mb=0.05, batch_max_size=1)
    with running_server(create_app(settings)) as url:
        yield url


def test_health_and_readiness_need_no_key(anonymous, secured):
    assert anonymous.get("/v1/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/v1/readyz")
    assert ready.status_code == 200
    engine = secured[1].state.engine
    assert ready.json() == {
        "status": "ready",
        "count": engine.count,
        "query_encoder_id": engine.query_encoder.encoder_id,
    }


def test_readiness_is_503_before_the_engine_is_open(serving_index):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(ServeSettings(index=serving_index)))  # no `with`: the lifespan has not run
    response = client.get("/v1/readyz")
    assert response.status_code == 503 and "starting" in response.json()["detail"]
    assert client.get("/v1/healthz").status_code == 200
    search = client.post("/v1/search", files={"image": ("q.png", b"x", "image/png")})
    assert search.status_code == 503 and search.json() == {"detail": "the search engine is not open yet; retry shortly"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/index"), ("GET", "/metrics"), ("POST", "/v1/search"), ("POST", "/v1/search/embedding")],
)
def test_protected_routes_need_the_key(anonymous, method, path):
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}):
        response = anonymous.request(method, path, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"detail": "missing or invalid API key"}


def test_the_right_key_opens_them(client, gallery):
    assert client.get("/v1/index").status_code == 200
    assert client.get("/metrics").status_code == 200
    response = client.post("/v1/search", files={"image": ("q.png", _png(gallery, 0), "image/png")})
    assert response.status_code == 200 and response.json()["hits"][0]["id"] == 0


def test_docs_are_open_and_offline(anonymous):
    page = anonymous.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert not re.search(r"(src|href)=[\"']https?://", page.text), "the docs page loads assets from another host"
    assert "cdn" not in page.text.lower()
    assets = re.findall(r"(?:src|href)=[\"'](/docs/assets/[^\"']+)[\"']", page.text)
    assert {a.rsplit("/", 1)[-1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        response = anonymous.get(asset)
        assert response.status_code == 200 and len(response.content) > 500, asset
    assert "SwaggerUIBundle" in anonymous.get("/docs/assets/swagger-ui-bundle.js").text
    assert anonymous.get("/docs/assets/index.html").status_code == 404  # only the three files are served
    assert anonymous.get("/redoc").status_code == 404  # FastAPI's CDN-backed pages are off
    spec = anonymous.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_cors_answers_the_configured_origin_only(anonymous, open_server):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    response = anonymous.options("/v1/search", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
    assert anonymous.get("/v1/healthz", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
    other = anonymous.get("/v1/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    with httpx.Client(base_url=open_server, timeout=30) as plain:  # cors_origins empty: no CORS headers at all
        response = plain.get("/v1/healthz", headers={"Origin": ORIGIN})
        assert not [h for h in response.headers if h.startswith("access-control-")]
        assert plain.get("/v1/index").status_code == 200  # and no key needed


def _embedding(secured, gallery, i: int) -> list[float]:
    engine = secured[1].state.engine
    return engine.embed([decode_image_bytes(_png(gallery, i))])[0].tolist()


def test_embedding_search_gives_the_image_search_hits(client, secured, gallery):
    info = client.get("/v1/index").json()
    for i in (1, 5):
        by_image = client.post("/v1/search", files={"image": ("q.png", _png(gallery, i), "image/png")}, data={"k": "5"})
        body = {"embedding": _embedding(secured, gallery, i), "encoder_id": info["query_encoder_id"], "k": 5}
        by_vector = client.post("/v1/search/embedding", json=body)
        assert by_vector.status_code == 200, by_vector.text
        a, b = by_image.json(), by_vector.json()
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]] and b["hits"][0]["id"] == i
        np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5)
        assert b["query_encoder_id"] == info["query_encoder_id"] and b["k"] == 5
    ranged = client.post("/v1/search/embedding", json={**body, "k": None, "min_score": 0.0}).json()
    assert ranged["range_search"] == "native" and all(h["score"] > 0.0 for h in ranged["hits"])


def test_embedding_validation(client, secured, gallery):
    info = client.get("/v1/index").json()
    good = _embedding(secured, gallery, 0)
    encoder = info["encoder_id"]

    def post(embedding, encoder_id=encoder, **extra):
        return client.post("/v1/search/embedding", json={"embedding": embedding, "encoder_id": encoder_id, **extra})

    wrong_dim = post(good[:-1])
    assert wrong_dim.status_code == 422 and "31 dimensions" in wrong_dim.json()["detail"]
    assert "32-d" in wrong_dim.json()["detail"]
    raw = json.dumps({"embedding": [float("nan"), *good[1:]], "encoder_id": encoder})  # Python writes NaN
    nan = client.post("/v1/search/embedding", content=raw, headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "non-finite" in nan.json()["detail"]
    doubled = post([2 * v for v in good])
    assert doubled.status_code == 422 and "L2-normalised" in doubled.json()["detail"]
    assert post([v * 1.004 for v in good]).status_code == 200  # within the tolerance (fp16 on-device)
    foreign = post(good, encoder_id="0123456789abcdef")
    assert foreign.status_code == 409 and "0123456789abcdef" in foreign.json()["detail"]
    assert encoder in foreign.json()["detail"]  # names what would be accepted
    assert post(good, k=MAX_K + 1).status_code == 422
    assert post(good, granularity="fine").status_code == 400  # uncalibrated index
    assert post(good, extra_field=1).status_code == 422
    assert post([], encoder_id=encoder).status_code == 422


def test_concurrent_load_is_error_free_and_batched(client, gallery):
    def worker(t: int) -> list[tuple[int, int]]:
        out = []
        for r in range(5):
            i = (t + r) % len(gallery)
            response = client.post("/v1/search", files={"image": ("q.png", _png(gallery, i), "image/png")})
            out.append((response.status_code, response.json()["hits"][0]["id"] if response.status_code == 200 else -1))
        return out

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = [pair for chunk in pool.map(worker, range(16)) for pair in chunk]
    assert len(results) == 80
    assert all(status == 200 for status, _ in results)
    expected = [(t + r) % len(gallery) for t in range(16) for r in range(5)]
    assert [hit for _, hit in results] == expected  # every answer is its own query's, batches do not mix them up
    metrics = _metrics(client.get("/metrics").text)
    count = metrics["retrieval_query_batch_size_count"]
    singles = metrics['retrieval_query_batch_size_bucket{le="1.0"}']
    assert singles < count, "no batch held more than one query"
    assert metrics["retrieval_query_batch_size_sum"] >= 80


def _metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_requests_latency_and_errors(client, anonymous, gallery):
    before = _metrics(client.get("/metrics").text)
    for _ in range(3):
        client.post("/v1/search", files={"image": ("q.png", _png(gallery, 2), "image/png")})
    client.post("/v1/search", files={"image": ("bad.png", b"not an image", "image/png")})
    anonymous.get("/v1/index")  # 401
    client.get("/v1/items/999999/nothing-here")  # 404, unmatched route
    after = _metrics(client.get("/metrics").text)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('retrieval_http_requests_total{method="POST",route="/v1/search",status="200"}') == 3
    assert delta('retrieval_http_requests_total{method="POST",route="/v1/search",status="400"}') == 1
    assert delta('retrieval_http_errors_total{route="/v1/index",status="401"}') == 1
    assert delta('retrieval_http_errors_total{route="unmatched",status="404"}') == 1
    assert delta('retrieval_http_request_duration_seconds_count{method="POST",route="/v1/search"}') == 4
    assert delta('retrieval_http_request_duration_seconds_sum{method="POST",route="/v1/search"}') > 0


def test_error_bodies_carry_no_server_paths(open_server, anonymous, client, serving_index, serving_onnx, gallery):
    secrets = {str(serving_index), str(serving_index.resolve()), str(serving_onnx), str(Path(serving_index).parents[1])}
    png = _png(gallery, 0)
    with httpx.Client(base_url=open_server, timeout=30) as plain:
        good = _embedding_via(plain, gallery)
        responses = [
            plain.post("/v1/search", files={"image": ("q.png", png, "image/png")}, data={"granularity": "fine"}),
            plain.post("/v1/search", files={"image": ("q.png", png, "image/png")}, data={"k": "0"}),
            plain.post("/v1/search", files={"image": ("n.txt", b"text", "text/plain")}),
            plain.post("/v1/search", files={"image": ("e.png", b"", "image/png")}),
            plain.post("/v1/search", files={"image": ("big.png", b"\0" * 60_000, "image/png")}),
            plain.post("/v1/search", files={"image": ("huge.png", b"\0" * 400_000, "image/png")}),
            plain.post("/v1/search", data={"k": "3"}),
            plain.post("/v1/search", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}),
            plain.post("/v1/search/embedding", content=b"{not json", headers={"content-type": "application/json"}),
            plain.post("/v1/search/embedding", json={"embedding": good, "encoder_id": "nope"}),
            plain.post("/v1/search/embedding", json={"embedding": good[:3], "encoder_id": "nope"}),
            plain.post(
                "/v1/search/embedding", json={"embedding": good, "encoder_id": _encoder(plain), "granularity": "x"}
            ),
            plain.get("/v1/nowhere"),
            plain.delete("/v1/search"),
            plain.get("/docs/assets/../../etc/passwd"),
            plain.get("/docs/assets/swagger-ui.css.map"),
        ]
    responses += [anonymous.get("/v1/index"), anonymous.get("/metrics", headers={"X-API-Key": "x"})]
    assert all(r.status_code >= 400 for r in responses), [r.status_code for r in responses]
    for response in responses:
        text = response.text
        assert response.headers["content-type"].startswith("application/json"), (response.status_code, text)
        assert "detail" in response.json()
        assert "Traceback" not in text and "/tmp" not in text and "pytest-" not in text, text
        for secret in secrets:
            assert secret not in text, text


def _encoder(plain: httpx.Client) -> str:
    return plain.get("/v1/index").json()["encoder_id"]


def _embedding_via(plain: httpx.Client, gallery) -> list[float]:
    # a unit vector of the right size; its values do not matter for the error cases
    dim = plain.get("/v1/index").json()["dim"]
    return [1.0 / np.sqrt(dim)] * dim


def test_a_students_vectors_are_accepted_next_to_the_teachers(serving_index, tiny_checkpoint, make_student, gallery):
    from fastapi.testclient import TestClient

    student = make_student(tiny_checkpoint)
    settings = ServeSettings(index=serving_index, query_encoder=student)
    with TestClient(create_app(settings)) as c:
        info = c.get("/v1/index").json()
        assert info["query_encoder_teacher_id"] == info["encoder_id"] != info["query_encoder_id"]
        assert info["accepted_encoder_ids"] == [info["encoder_id"], info["query_encoder_id"]]
        engine = c.app.state.engine
        vector = engine.embed([decode_image_bytes(_png(gallery, 3))])[0].tolist()
        for encoder_id in info["accepted_encoder_ids"]:
            response = c.post("/v1/search/embedding", json={"embedding": vector, "encoder_id": encoder_id})
            assert response.status_code == 200 and response.json()["query_encoder_id"] == encoder_id
        assert c.post("/v1/search/embedding", json={"embedding": vector, "encoder_id": "x" * 16}).status_code == 409
