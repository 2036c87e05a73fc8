"""Query-encoder runtimes: ONNX Runtime (numpy preprocessing) and PyTorch give the same embeddings."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from serving.onnx_metadata import OnnxMetadataError
from serving.runtimes import (
    DEFAULT_BATCH_SIZE,
    RUNTIMES,
    OnnxRuntimeQueryEncoder,
    QueryEncoder,
    QueryEncoderError,
    TensorRTQueryEncoder,
    TorchQueryEncoder,
    open_query_encoder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _queries(n: int) -> list[Image.Image]:
    """Seeded images of varied sizes and modes (the runtimes resize and convert them)."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (24 + 9 * i, 40, 3), dtype=np.uint8)) for i in range(n)]
    images[0] = images[0].convert("L")
    images[1] = images[1].convert("RGBA")
    return images


def test_runtimes_registered():
    assert RUNTIMES.names() == ["onnxruntime", "tensorrt", "torch"]
    assert RUNTIMES.get("onnxruntime") is OnnxRuntimeQueryEncoder
    assert RUNTIMES.get("tensorrt") is TensorRTQueryEncoder
    assert RUNTIMES.get("torch") is TorchQueryEncoder


def test_onnxruntime_and_torch_give_the_same_embeddings(tiny_checkpoint, serving_onnx):
    torch_rt = open_query_encoder(tiny_checkpoint, device="cpu")
    onnx_rt = open_query_encoder(serving_onnx, threads=1)
    assert isinstance(torch_rt, TorchQueryEncoder) and isinstance(onnx_rt, OnnxRuntimeQueryEncoder)
    for runtime in (torch_rt, onnx_rt):
        assert isinstance(runtime, QueryEncoder)
    assert onnx_rt.encoder_id == torch_rt.encoder_id
    assert onnx_rt.teacher_id == torch_rt.teacher_id is None
    assert onnx_rt.dim == torch_rt.dim == 32
    assert onnx_rt.preprocess == torch_rt.preprocess
    assert (onnx_rt.info.input_format, onnx_rt.info.precision) == ("float32_normalized", "fp32")

    images = _queries(5)
    a = torch_rt.encode(images)
    b = onnx_rt.encode(images)
    assert a.shape == b.shape == (5, 32)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() >= 0.9999
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_center_crop_preprocessing_matches_too(make_checkpoint, tiny_encoder_config, tmp_path):
    """The numpy resize/crop must agree with torchvision's for the other resize policy as well."""
    import torch

    from models import Encoder, save_encoder
    from retrieval.data.preprocess import PreprocessConfig
    from serving.export import export_onnx

    torch.manual_seed(5)
    config = tiny_encoder_config.model_copy(
        update={"preprocess": PreprocessConfig(input_size=32, resize="center_crop")}
    )
    save_encoder(Encoder(config).eval(), tmp_path / "ckpt")
    exported = export_onnx(tmp_path / "ckpt", tmp_path / "crop.onnx").path
    images = _queries(4)
    a = TorchQueryEncoder(tmp_path / "ckpt", device="cpu").encode(images)
    b = OnnxRuntimeQueryEncoder(exported, threads=1).encode(images)
    assert (a * b).sum(axis=1).min() >= 0.9999


def test_encode_batches_and_empty_input(serving_onnx):
    runtime = OnnxRuntimeQueryEncoder(serving_onnx, batch_size=2, threads=1)
    images = _queries(5)
    whole = OnnxRuntimeQueryEncoder(serving_onnx, threads=1).encode(images)
    np.testing.assert_allclose(runtime.encode(images), whole, atol=1e-5)
    np.testing.assert_allclose(runtime.encode(images[3:4])[0], whole[3], atol=1e-5)
    empty = runtime.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert OnnxRuntimeQueryEncoder(serving_onnx).batch_size == DEFAULT_BATCH_SIZE
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        OnnxRuntimeQueryEncoder(serving_onnx, batch_size=0)


def test_providers_are_logged_and_overridable(serving_onnx, caplog):
    with caplog.at_level(logging.INFO, logger="serving.runtimes"):
        runtime = OnnxRuntimeQueryEncoder(serving_onnx, providers=["cpu"], threads=1)
    assert runtime.providers == ["CPUExecutionProvider"]
    assert "runs on CPUExecutionProvider" in caplog.text
    assert "CPUExecutionProvider" in repr(runtime)


def test_open_query_encoder_errors_name_the_path(tmp_path, tiny_checkpoint, serving_onnx):
    with pytest.raises(QueryEncoderError, match=r"not found: .*missing"):
        open_query_encoder(tmp_path / "missing")
    with pytest.raises(QueryEncoderError, match=r"ONNX query encoder .*encoder is not a file"):
        open_query_encoder(tiny_checkpoint, runtime="onnxruntime")
    with pytest.raises(QueryEncoderError, match=r"runtime 'torch' takes no option providers; it takes: device, batch"):
        open_query_encoder(tiny_checkpoint, providers=["cpu"])
    with pytest.raises(QueryEncoderError, match=r"runtime 'onnxruntime' takes no option device; it takes: providers"):
        open_query_encoder(serving_onnx, device="cpu")


def test_onnx_file_without_metadata_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bare",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(
        QueryEncoderError, match=r"(?s)no query-encoder runtime can open .*bare\.onnx lacks query-encoder"
    ):
        open_query_encoder(path)
    with pytest.raises(OnnxMetadataError, match=r"bare\.onnx lacks query-encoder metadata"):
        open_query_encoder(path, runtime="onnxruntime")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(QueryEncoderError, match=r"cannot load .*garbage\.onnx"):
        open_query_encoder(garbage, runtime="onnxruntime")
