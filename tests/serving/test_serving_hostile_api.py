"""Issue 12's smaller API holes and a broken encoder, against real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from retrieval.data.images import DRAFT_SIDE_FACTOR, ImageTooLargeError, decode_image_bytes
from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings


@pytest.fixture(scope="module")
def client(serving_index, serving_onnx):
    settings = ServeSettings(index=serving_index, query_encoder=serving_onnx, max_image_mp=30)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _png(serving_gallery: Path, i: int) -> bytes:
    return (serving_gallery.parent / f"img_{i}.png").read_bytes()


def test_second_image_part_is_refused(client, serving_gallery):
    image = ("q.png", _png(serving_gallery, 0), "image/png")
    response = client.post("/v1/search", files=[("image", image), ("image", image)])
    assert response.status_code == 400 and response.json() == {"detail": "send one image per request; the form has 2"}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "2"])
def test_min_score_must_be_finite_in_range(client, serving_gallery, value):
    files = {"image": ("q.png", _png(serving_gallery, 0), "image/png")}
    response = client.post("/v1/search", files=files, data={"min_score": value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "min_score must be a finite number in [-1, 1]"
    info = client.get("/v1/index").json()
    body = f'{{"embedding": [1.0{", 0.0" * (info["dim"] - 1)}], "encoder_id": "{info["encoder_id"]}", '
    body += f'"min_score": {value.replace("nan", "NaN").replace("inf", "Infinity")}}}'
    response = client.post("/v1/search/embedding", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "min_score must be a finite number in [-1, 1]"


def test_pixel_limit_is_read_from_the_header(client):
    big = Image.new("L", (6000, 6000))  # 36 MP > the fixture's 30 MP limit
    data = io.BytesIO()
    big.save(data, format="PNG")
    response = client.post("/v1/search", files={"image": ("big.png", data.getvalue(), "image/png")})
    assert response.status_code == 413
    assert (
        response.json()["detail"]
        == "image big.png is too large: 6000x6000 is 36.0 megapixels; the limit is 30 megapixels"
    )
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(data.getvalue(), "big.png", max_pixels=30_000_000)


def test_large_jpeg_is_drafted_and_still_finds_the_same_item(client, serving_gallery):
    """A 20 MP JPEG decodes at reduced scale (1/4 here), and the search's top-1 is unchanged."""
    upscaled = Image.open(serving_gallery.parent / "img_4.png").convert("RGB").resize((5200, 4000), Image.BILINEAR)
    out = io.BytesIO()
    upscaled.save(out, format="JPEG", quality=95)
    jpeg = out.getvalue()
    full = decode_image_bytes(jpeg)
    drafted = decode_image_bytes(jpeg, target_size=224)
    assert full.size == (5200, 4000) and min(drafted.size) >= 224 * DRAFT_SIDE_FACTOR and drafted.size[0] < 5200
    small = decode_image_bytes(_png(serving_gallery, 4), target_size=224)  # ordinary images: exactly as before
    assert np.array_equal(np.asarray(small), np.asarray(decode_image_bytes(_png(serving_gallery, 4))))
    hits = client.post("/v1/search", files={"image": ("big.jpg", jpeg, "image/jpeg")}).json()["hits"]
    assert hits[0]["id"] == 4


@pytest.fixture(scope="module")
def nan_onnx(serving_onnx, tmp_path_factory) -> Path:
    """The tiny export with its largest weight tensor set to NaN, resealed so its checksum matches: a broken model."""
    import onnx
    from onnx import numpy_helper

    from serving.model_checksum import CHECKSUM_KEY, PLACEHOLDER, seal_file

    model = onnx.load(serving_onnx)
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest).copy()
    weights[...] = np.nan
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    for prop in model.metadata_props:
        if prop.key == CHECKSUM_KEY:
            prop.value = PLACEHOLDER
    path = tmp_path_factory.mktemp("nan_onnx") / "encoder.onnx"
    onnx.save(model, path)
    seal_file(path)
    return path


def test_non_finite_encoder_is_a_500_json_and_not_ready(serving_index, nan_onnx, serving_gallery):
    settings = ServeSettings(index=serving_index, query_encoder=nan_onnx)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(100):  # the warm-up runs in the background
            ready = client.get("/v1/readyz")
            if ready.status_code == 200 or "warm-up" in ready.text:
                break
            time.sleep(0.05)
        assert ready.status_code == 503 and "non-finite" in ready.json()["detail"]
        response = client.post("/v1/search", files={"image": ("q.png", _png(serving_gallery, 0), "image/png")})
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert "non-finite values" in detail and str(nan_onnx.parent) not in detail and "/" not in detail
        metrics = client.get("/metrics").text
        assert 'retrieval_http_errors_total{route="/v1/search",status="500"} 1.0' in metrics
