"""Query-encoder runtimes: ONNX Runtime and PyTorch give the same embeddings; paths pick the runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from retrieval.registry import UnknownNameError
from serving.onnx_metadata import OnnxMetadataError
from serving.runtimes import (
    RUNTIMES,
    OnnxRuntimeQueryEncoder,
    QueryEncoder,
    QueryEncoderError,
    TorchQueryEncoder,
    open_query_encoder,
)


def _queries(n: int) -> list[Image.Image]:
    """Seeded images of varied sizes and modes (the runtimes resize and convert them)."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (24 + 9 * i, 40, 3), dtype=np.uint8)) for i in range(n)]
    images[0] = images[0].convert("L")
    return images


def test_runtimes_registered():
    assert RUNTIMES.names() == ["onnxruntime", "torch"]


def test_onnxruntime_and_torch_give_the_same_embeddings(tiny_checkpoint, serving_onnx):
    torch_rt = open_query_encoder(tiny_checkpoint)
    onnx_rt = open_query_encoder(serving_onnx)
    assert isinstance(torch_rt, TorchQueryEncoder) and isinstance(onnx_rt, OnnxRuntimeQueryEncoder)
    for runtime in (torch_rt, onnx_rt):
        assert isinstance(runtime, QueryEncoder)
    assert onnx_rt.encoder_id == torch_rt.encoder_id
    assert onnx_rt.teacher_id == torch_rt.teacher_id is None
    assert onnx_rt.dim == torch_rt.dim == 32
    assert onnx_rt.preprocess == torch_rt.preprocess

    images = _queries(5)
    a = torch_rt.encode(images)
    b = onnx_rt.encode(images)
    assert a.shape == b.shape == (5, 32)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() >= 0.9999
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_encode_batches_and_empty_input(serving_onnx):
    runtime = OnnxRuntimeQueryEncoder(serving_onnx, batch_size=2)
    images = _queries(5)
    np.testing.assert_allclose(runtime.encode(images), OnnxRuntimeQueryEncoder(serving_onnx).encode(images), atol=1e-5)
    empty = runtime.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32


def test_open_query_encoder_errors_name_the_path(tmp_path):
    with pytest.raises(QueryEncoderError, match=r"not found: .*missing"):
        open_query_encoder(tmp_path / "missing")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(QueryEncoderError, match=r"weights\.bin.*checkpoint directory.*\.onnx"):
        open_query_encoder(weights)
    with pytest.raises(UnknownNameError, match="valid names: onnxruntime, torch"):
        open_query_encoder(weights, runtime="tensorflow")


def test_onnx_file_without_metadata_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bare",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(OnnxMetadataError, match=r"bare\.onnx lacks query-encoder metadata"):
        open_query_encoder(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(QueryEncoderError, match=r"cannot load .*garbage\.onnx"):
        open_query_encoder(garbage)
