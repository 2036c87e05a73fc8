"""The query path's stages as the server runs them: runtime prepare/infer, the finite check, the response.

``benchmarks/bench_query_stages.py`` times these functions one by one; these tests check that chaining them
is exactly what the engine and the server do (same vectors, same hits), so the benchmark times the real path.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexing import SearchHit, SearchResults
from serving.api.queries import Answer, answer_image_queries
from serving.api.search import build_response
from serving.engine import NonFiniteEmbeddingError, SearchEngine
from serving.runtimes.onnx_runtime import OnnxRuntimeQueryEncoder
from serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_query_stages", ROOT / "benchmarks" / "bench_query_stages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_query_stages", module)
    spec.loader.exec_module(module)
    return module


def test_onnx_encode_is_prepare_then_infer(serving_onnx):
    encoder = OnnxRuntimeQueryEncoder(serving_onnx, batch_size=2)
    images = [Image.open(io.BytesIO(_jpeg(seed))).convert("RGB") for seed in range(3)]
    encoded = encoder.encode(images)
    staged = np.concatenate(
        [encoder.infer(encoder.prepare(images[:2]), 2), encoder.infer(encoder.prepare(images[2:]), 1)]
    )
    np.testing.assert_array_equal(encoded, staged)
    assert encoded.shape == (3, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(encoded, axis=1), 1.0, atol=1e-5)
    assert encoder.prepare(images[:1]).shape == (1, 3, encoder.preprocess.input_size, encoder.preprocess.input_size)


def test_onnx_runtime_threads_sleep_instead_of_spinning(serving_onnx):
    encoder = OnnxRuntimeQueryEncoder(serving_onnx)
    options = encoder.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_torch_encode_is_prepare_then_infer(tiny_checkpoint):
    from serving.runtimes.torch_runtime import TorchQueryEncoder

    encoder = TorchQueryEncoder(tiny_checkpoint, device="cpu")
    images = [Image.open(io.BytesIO(_jpeg(seed))).convert("RGB") for seed in range(2)]
    np.testing.assert_array_equal(encoder.encode(images), encoder.infer(encoder.prepare(images)))


def test_checked_embeddings_refuses_non_finite_vectors(serving_index, serving_onnx):
    with SearchEngine.open(serving_index, serving_onnx) as engine:
        vectors = np.eye(2, engine.dim, dtype=np.float32)
        assert engine.checked_embeddings(vectors) is vectors
        vectors[1, 0] = np.nan
        with pytest.raises(NonFiniteEmbeddingError, match="1 of 2 images"):
            engine.checked_embeddings(vectors)


def test_build_response_carries_the_hits_and_the_range_mode():
    hits = SearchResults(
        (SearchHit(id=4, score=0.9, path="a.jpg", labels={"fine": "x"}, level="fine", extra={"sku": "S"}),
         SearchHit(id=7, score=0.5))
    )  # fmt: skip
    response = build_response(Answer(hits), 5, "enc", "fine", None, 12.34567)
    body = json.loads(response.model_dump_json())
    assert body["k"] == 5 and body["took_ms"] == 12.346 and body["range_search"] is None
    assert [hit["id"] for hit in body["hits"]] == [4, 7]
    assert body["hits"][0]["thumbnail_url"] == "/v1/items/4/thumbnail" and body["hits"][0]["extra"] == {"sku": "S"}
    assert body["hits"][1]["extra"] is None and body["hits"][1]["level"] is None
    assert build_response(Answer(hits, True), 5, "enc", None, 0.1, 0).range_search == "knn_fallback"
    assert build_response(Answer(hits, False), 5, "enc", None, 0.1, 0).range_search == "native"


def test_the_benchmark_times_the_servers_own_path(serving_index, serving_onnx):
    bench = _bench_module()
    settings = ServeSettings(index=serving_index, query_encoder=serving_onnx)
    with SearchEngine.open(serving_index, serving_onnx) as engine:
        pipeline = bench.Pipeline(engine, settings, 4)
        for seed in range(3):
            data = _jpeg(seed)
            times, results = pipeline.staged(data)
            assert list(times) == list(bench.STAGES) and all(ms >= 0 for ms in times.values())
            (answer,) = answer_image_queries(engine, [pipeline.query(data)])
            assert results == answer.results
            assert len(results) == 4
        report = bench.measure(pipeline, [_jpeg(0), _jpeg(1)], 3)
    assert set(report["stages"]) == set(bench.STAGES)
    assert report["sum_p50_ms"] == pytest.approx(sum(s["p50_ms"] for s in report["stages"].values()))
    assert sum(s["share"] for s in report["stages"].values()) == pytest.approx(1.0)
    assert all(stage not in bench.UNCAPPED for stage in report["over_budget"])
