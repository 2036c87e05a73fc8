"""The HTTP API against a real uvicorn server on 127.0.0.1, exercised with httpx."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from indexing import IndexFormatError
from retrieval.data.datasets import CsvImageDataset
from serving.api.server import running_server
from serving.app import create_app, serve
from serving.engine import EncoderMismatchError
from serving.runtimes import QueryEncoderError
from serving.settings import ServeSettings

MAX_K = 20
UPLOAD_MB = 0.05  # ~51 KiB: large enough for the gallery PNGs, small enough to test 413 cheaply


@pytest.fixture(scope="module")
def server(serving_index) -> Iterator[str]:
    """Serve the uncalibrated test index on a free loopback port in a thread; yield its base URL."""
    settings = ServeSettings(index=serving_index, default_k=3, max_k=MAX_K, max_upload_mb=UPLOAD_MB)
    with running_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def gallery(serving_gallery) -> CsvImageDataset:
    return CsvImageDataset(serving_gallery)


def _png(gallery: CsvImageDataset, i: int) -> bytes:
    return Path(gallery.paths[i]).read_bytes()


def test_healthz_and_index(client, gallery):
    response = client.get("/v1/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    body = client.get("/v1/index").json()
    assert body["count"] == len(gallery) and body["dim"] == 32
    assert body["encoder_id"] == body["query_encoder_id"] and len(body["encoder_id"]) == 16
    assert body["accepted_encoder_ids"] == [body["encoder_id"]] and body["query_encoder_teacher_id"] is None
    assert body["granularities"] == [] and body["thresholds"] == {} and body["index_type"] == "Flat"


def test_search_returns_ranked_hits_with_itself_first(client, gallery):
    for i in (0, 4):
        response = client.post("/v1/search", files={"image": (f"q{i}.png", _png(gallery, i), "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["k"] == 3 and body["took_ms"] > 0
        assert body["granularity"] is None and body["min_score"] is None and body["range_search"] is None
        hits = body["hits"]
        assert len(hits) == 3
        assert set(hits[0]) == {"id", "score", "path", "labels", "level", "extra", "thumbnail_url"}
        assert hits[0]["level"] is None and hits[0]["thumbnail_url"] == f"/v1/items/{i}/thumbnail"
        assert hits[0]["extra"] == {"sku": f"SKU-{i:03d}"}  # the gallery CSV's other columns come back
        assert hits[0]["id"] == i and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["labels"] == gallery.label_names(i) and hits[0]["path"] == gallery.names[i]
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)
        assert len({hit["id"] for hit in hits}) == 3


def test_k_from_the_form_only(client, gallery):
    files = {"image": ("q.png", _png(gallery, 1), "image/png")}
    assert len(client.post("/v1/search", files=files, data={"k": "5"}).json()["hits"]) == 5
    # One place per parameter: a query-string k is not read (the default 3 applies), nor does it override the form.
    assert len(client.post("/v1/search", files=files, params={"k": 2}).json()["hits"]) == 3
    assert len(client.post("/v1/search", files=files, data={"k": "4"}, params={"k": 2}).json()["hits"]) == 4
    everything = client.post("/v1/search", files=files, data={"k": str(MAX_K)}).json()
    assert everything["k"] == MAX_K and len(everything["hits"]) == len(gallery)


@pytest.mark.parametrize("k", ["0", "-3", str(MAX_K + 1), "ten"])
def test_bad_k_is_422(client, gallery, k):
    response = client.post("/v1/search", files={"image": ("q.png", _png(gallery, 0), "image/png")}, data={"k": k})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "k"


def test_non_image_upload_is_400_with_the_file_name(client):
    response = client.post("/v1/search", files={"image": ("notes.txt", b"hello, not an image", "text/plain")})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"detail": "cannot read image notes.txt: not a recognised image format"}


def test_truncated_and_empty_uploads_are_400(client, gallery):
    truncated = _png(gallery, 0)[:200]
    response = client.post("/v1/search", files={"image": ("cut.png", truncated, "image/png")})
    assert response.status_code == 400 and response.json()["detail"].startswith("cannot read image cut.png: ")
    response = client.post("/v1/search", files={"image": ("empty.png", b"", "image/png")})
    assert response.status_code == 400 and response.json() == {"detail": "cannot read image empty.png: empty file"}


def test_missing_image_field_is_422(client):
    response = client.post("/v1/search", data={"k": "3"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "image"]


def test_too_large_upload_is_413(client):
    limit = int(UPLOAD_MB * 1024 * 1024)
    # Over the file limit but within the multipart allowance: refused by the endpoint after reading.
    response = client.post("/v1/search", files={"image": ("big.png", b"\0" * (limit + 10), "image/png")})
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]
    # Far over: refused from Content-Length before the body is read.
    response = client.post("/v1/search", files={"image": ("huge.png", b"\0" * (limit * 4), "image/png")})
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]


def test_too_large_chunked_upload_is_413(server):
    # No Content-Length: the body streams in chunks and is cut off once past the limit.
    boundary = "xBOUNDARYx"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(40):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with httpx.Client(base_url=server, timeout=30) as c:
        response = c.post("/v1/search", content=chunks(), headers=headers)
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]


def test_concurrent_searches(client, gallery):
    def one(i: int) -> int:
        response = client.post("/v1/search", files={"image": ("q.png", _png(gallery, i), "image/png")})
        return response.json()["hits"][0]["id"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(one, range(len(gallery)))) == list(range(len(gallery)))


def test_settings_validation_and_environment(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="default_k"):
        ServeSettings(index=tmp_path, default_k=50, max_k=10)
    monkeypatch.setenv("RETRIEVAL_INDEX", str(tmp_path))
    monkeypatch.setenv("RETRIEVAL_PORT", "9123")
    settings = ServeSettings()
    assert settings.index == tmp_path and settings.port == 9123 and settings.host == "127.0.0.1"
    assert (settings.default_k, settings.max_k, settings.max_upload_mb) == (10, 100, 10)
    assert settings.api_key is None and settings.cors_origins == [] and settings.batch_max_size == 1
    monkeypatch.setenv("RETRIEVAL_MAX_K", "4")
    assert (ServeSettings().default_k, ServeSettings().max_k) == (4, 4)  # the default follows a lower max_k
    monkeypatch.setenv("RETRIEVAL_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("RETRIEVAL_API_KEY", "s3cret")
    monkeypatch.setenv("RETRIEVAL_BATCH_MAX_SIZE", "8")
    settings = ServeSettings()
    assert settings.cors_origins == ["https://a.example", "https://b.example"] and settings.batch_max_size == 8
    assert settings.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    monkeypatch.setenv("RETRIEVAL_CORS_ORIGINS", '["https://c.example"]')
    assert ServeSettings().cors_origins == ["https://c.example"]
    monkeypatch.delenv("RETRIEVAL_API_KEY")
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert ServeSettings(api_key_file=key_file).api_key.get_secret_value() == "from-a-file"
    with pytest.raises(ValidationError, match="not both"):
        ServeSettings(api_key_file=key_file, api_key="x")
    with pytest.raises(ValidationError, match="cannot read api_key_file"):
        ServeSettings(api_key_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="batch_max_size"):
        ServeSettings(batch_max_size=0)


def test_create_app_loads_nothing_and_documents_the_api(tmp_path):
    # The index does not exist: building the app must not touch it (loading happens in the lifespan).
    app = create_app(ServeSettings(index=tmp_path / "no-index", max_k=7))
    spec = app.openapi()
    search = spec["paths"]["/v1/search"]["post"]
    assert "parameters" not in search  # every parameter is a form field, none in the query string
    form_ref = search["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    form = spec["components"]["schemas"][form_ref]["properties"]
    assert set(form) == {"image", "k", "granularity", "min_score", "where"} and form["k"]["anyOf"][0]["maximum"] == 7
    assert all(field.get("description") for field in form.values())
    for path in ("/v1/healthz", "/v1/readyz", "/v1/index", "/v1/search/embedding", "/metrics"):
        assert path in spec["paths"], path
    for name in ("SearchResponse", "Hit", "EmbeddingSearchRequest", "IndexDescription"):
        fields = spec["components"]["schemas"][name]["properties"]
        assert all(field.get("description") for field in fields.values()), name


def test_validation_errors_do_not_echo_the_input(client):
    response = client.post("/v1/search", data={"image": "secret text sent as a plain field"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "image"]
    assert "secret" not in response.text


def test_serve_reports_wrong_paths_before_starting(serving_index, other_checkpoint, tmp_path):
    with pytest.raises(IndexFormatError, match="index directory not found"):
        serve(ServeSettings(index=tmp_path / "nowhere"))
    with pytest.raises(IndexFormatError, match=r"manifest\.json is missing"):
        serve(ServeSettings(index=tmp_path))
    with pytest.raises(QueryEncoderError, match="query encoder not found"):
        serve(ServeSettings(index=serving_index, query_encoder=tmp_path / "model.onnx"))
    with pytest.raises(EncoderMismatchError):
        serve(ServeSettings(index=serving_index, query_encoder=other_checkpoint))


def test_granularity_on_an_uncalibrated_index_is_400(client, gallery):
    files = {"image": ("q.png", _png(gallery, 0), "image/png")}
    response = client.post("/v1/search", files=files, data={"granularity": "fine"})
    assert response.status_code == 400
    assert "retrieval index calibrate" in response.json()["detail"]
    plain = client.post("/v1/search", files=files).json()
    assert all(hit["level"] is None for hit in plain["hits"])  # no calibration: no level


def test_search_at_a_granularity(calibrated_index, gallery):
    from fastapi.testclient import TestClient

    settings = ServeSettings(index=calibrated_index, default_k=3, max_k=MAX_K, max_upload_mb=UPLOAD_MB)
    with TestClient(create_app(settings)) as calibrated:
        thresholds = calibrated.app.state.engine.thresholds
        files = {"image": ("q.png", _png(gallery, 2), "image/png")}
        plain = calibrated.post("/v1/search", files=files, data={"k": str(MAX_K)}).json()
        assert plain["hits"][0]["level"] == "fine" and plain["granularity"] is None
        for level, threshold in thresholds.items():
            for options in ({"data": {"granularity": level, "k": "5"}},):
                response = calibrated.post("/v1/search", files=files, **options)
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["granularity"] == level and len(body["hits"]) <= 5
                expected = [h["id"] for h in plain["hits"] if h["score"] >= threshold][:5]
                assert [h["id"] for h in body["hits"]] == expected
                assert all(h["score"] >= threshold and "level" in h for h in body["hits"])
        unknown = calibrated.post("/v1/search", files=files, data={"granularity": "tiny"})
        assert unknown.status_code == 422
        assert (
            "unknown granularity 'tiny'" in unknown.json()["detail"]
            and "fine, middle, coarse" in unknown.json()["detail"]
        )


def test_search_with_min_score_returns_every_hit_above_it(client, gallery):
    files = {"image": ("q.png", _png(gallery, 2), "image/png")}
    plain = client.post("/v1/search", files=files, data={"k": str(len(gallery))}).json()["hits"]
    threshold = (plain[2]["score"] + plain[3]["score"]) / 2  # between the 3rd and 4th best
    for options in ({"data": {"min_score": str(threshold)}},):
        response = client.post("/v1/search", files=files, **options)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["min_score"] == pytest.approx(threshold) and body["range_search"] == "native"  # Flat has one
        assert [h["id"] for h in body["hits"]] == [h["id"] for h in plain[:3]]
    capped = client.post("/v1/search", files=files, data={"min_score": str(threshold), "k": "1"}).json()
    assert [h["id"] for h in capped["hits"]] == [plain[0]["id"]]
    for bad in ({"min_score": "1.5"}, {"min_score": "0.2", "granularity": "fine"}):
        assert client.post("/v1/search", files=files, data=bad).status_code == 422
