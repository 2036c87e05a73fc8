"""The ONNX Runtime query encoder feeds each kind of exported file the way its metadata says.

The models are built here with ``onnx.helper`` (no export, no torch): a mobile-style graph that takes
uint8 RGB pixels and normalises itself, an fp16 graph with float32 I/O, and a float graph with a static
batch. Each projects the whole flattened image with a fixed seeded matrix, so every pixel's position,
channel and value reaches the output: a wrong layout, channel order, dtype or normalisation would show.
The expected vectors are computed in numpy from ``retrieval.data.preprocess``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from retrieval.data.preprocess import PreprocessConfig, preprocess_array
from serving.onnx_metadata import ONNX_FORMAT
from serving.runtimes import OnnxRuntimeQueryEncoder, QueryEncoderError, open_query_encoder, runtime_for

SIZE = 16
DIM = 8
PRE = PreprocessConfig(input_size=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resize="center_crop")
WEIGHTS = np.random.default_rng(11).normal(size=(3 * SIZE * SIZE, DIM)).astype(np.float32)


def _metadata(input_format: str, precision: str) -> dict[str, str]:
    """Properties as ``serving.onnx_metadata.encoder_metadata`` writes them."""
    return {
        "format": ONNX_FORMAT,
        "encoder_id": f"tiny-{input_format}-{precision}",
        "teacher_id": "",
        "embedding_dim": str(DIM),
        "input_size": str(SIZE),
        "mean": json.dumps(list(PRE.mean)),
        "std": json.dumps(list(PRE.std)),
        "resize": PRE.resize,
        "levels": json.dumps(["fine"]),
        "input_format": input_format,
        "precision": precision,
    }


def _save(nodes: list, inputs: list, initializers: list, path: Path, metadata: dict[str, str]) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        inputs,
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _project(prefix: str, source: str, weights: np.ndarray) -> tuple[list, list]:
    """Flatten -> MatMul by ``weights`` -> L2 normalise into ``embeddings``."""
    nodes = [
        helper.make_node("Flatten", [source], [f"{prefix}_flat"], axis=1),
        helper.make_node("MatMul", [f"{prefix}_flat", "W"], [f"{prefix}_proj"]),
    ]
    return nodes, [numpy_helper.from_array(weights, "W")]


def build_uint8_model(path: Path) -> Path:
    """The mobile contract: uint8 (1, 3, S, S) RGB -> Cast -> /255 -> -mean -> /std -> projection -> L2 normalise."""
    channel = (1, 3, 1, 1)
    constants = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(PRE.mean, np.float32).reshape(channel), "mean"),
        numpy_helper.from_array(np.array(PRE.std, np.float32).reshape(channel), "std"),
    ]
    head, weights = _project("p", "normalised", WEIGHTS)
    nodes = [
        helper.make_node("Cast", ["image"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalised"]),
        *head,
        helper.make_node("LpNormalization", ["p_proj"], ["embeddings"], axis=1, p=2),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 3, SIZE, SIZE])]
    return _save(nodes, inputs, constants + weights, path, _metadata("uint8_rgb", "int8"))


def build_fp16_model(path: Path) -> Path:
    """float32 normalised (N, 3, S, S) -> Cast fp16 -> fp16 projection -> Cast fp32 -> L2 normalise."""
    head, weights = _project("p", "half", WEIGHTS.astype(np.float16))
    nodes = [
        helper.make_node("Cast", ["images"], ["half"], to=TensorProto.FLOAT16),
        *head,
        helper.make_node("Cast", ["p_proj"], ["single"], to=TensorProto.FLOAT),
        helper.make_node("LpNormalization", ["single"], ["embeddings"], axis=1, p=2),
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])]
    return _save(nodes, inputs, weights, path, _metadata("float32_normalized", "fp16"))


def build_float_model(path: Path, batch: int | str, input_format: str = "float32_normalized") -> Path:
    """float32 normalised (batch, 3, S, S) -> projection -> L2 normalise; ``batch`` fixed or a dynamic name."""
    head, weights = _project("p", "images", WEIGHTS)
    nodes = [*head, helper.make_node("LpNormalization", ["p_proj"], ["embeddings"], axis=1, p=2)]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])]
    return _save(nodes, inputs, weights, path, _metadata(input_format, "fp32"))


def to_ort_format(onnx_path: Path) -> Path:
    """Convert with ONNX Runtime itself (basic optimisations only, so the file is portable)."""
    out = onnx_path.with_suffix(".ort")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return out


def expected(images: list[Image.Image]) -> np.ndarray:
    """The reference: numpy preprocessing, the same projection, L2 normalisation."""
    flat = np.stack([preprocess_array(image, PRE).reshape(-1) for image in images])
    out = flat @ WEIGHTS
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def queries(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def uint8_model(tmp_path_factory) -> Path:
    return build_uint8_model(tmp_path_factory.mktemp("uint8") / "mobile.onnx")


def test_uint8_model_is_fed_resized_pixels_one_at_a_time(uint8_model):
    runtime = open_query_encoder(uint8_model, threads=1)
    assert isinstance(runtime, OnnxRuntimeQueryEncoder)
    assert (runtime.info.input_format, runtime.info.precision) == ("uint8_rgb", "int8")
    assert runtime.preprocess == PRE
    images = queries(5)
    out = runtime.encode(images)
    assert out.shape == (5, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(images), atol=1e-5)
    assert runtime.encode([]).shape == (0, DIM)


def test_ort_format_copy_runs_the_same(uint8_model):
    ort_path = to_ort_format(uint8_model)
    assert ort_path.read_bytes()[4:8] == b"ORTM"
    assert runtime_for(ort_path) == "onnxruntime"
    runtime = open_query_encoder(ort_path, threads=1)
    assert runtime.info.input_format == "uint8_rgb"  # metadata read from the session, not with the onnx package
    images = queries(3)
    np.testing.assert_allclose(runtime.encode(images), expected(images), atol=1e-5)


def test_onnx_file_named_ort_is_loaded_as_onnx(uint8_model, tmp_path):
    """ONNX Runtime would guess the format from the suffix; the runtime tells it from the content."""
    misnamed = tmp_path / "actually_onnx.ort"
    shutil.copy(uint8_model, misnamed)
    assert runtime_for(misnamed) == "onnxruntime"
    images = queries(2)
    np.testing.assert_allclose(open_query_encoder(misnamed, threads=1).encode(images), expected(images), atol=1e-5)


def test_fp16_model_keeps_float32_io_and_unit_rows(tmp_path):
    runtime = open_query_encoder(build_fp16_model(tmp_path / "half.onnx"), batch_size=2, threads=1)
    assert runtime.info.precision == "fp16"
    images = queries(5)
    out = runtime.encode(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)  # normalised again in float32
    assert (out * expected(images)).sum(axis=1).min() >= 0.999


def test_static_batch_is_padded(tmp_path):
    runtime = open_query_encoder(build_float_model(tmp_path / "static.onnx", batch=2), threads=1)
    images = queries(3)
    np.testing.assert_allclose(runtime.encode(images), expected(images), atol=1e-5)


def test_dynamic_float_model_matches_reference(tmp_path):
    runtime = open_query_encoder(build_float_model(tmp_path / "dynamic.onnx", batch="batch"), batch_size=2, threads=1)
    images = queries(5)
    np.testing.assert_allclose(runtime.encode(images), expected(images), atol=1e-5)


def test_input_type_that_contradicts_the_metadata_is_refused(tmp_path):
    path = build_float_model(tmp_path / "liar.onnx", batch=1, input_format="uint8_rgb")
    with pytest.raises(
        QueryEncoderError, match=r"liar\.onnx: its metadata says input_format 'uint8_rgb'.*tensor\(float\)"
    ):
        OnnxRuntimeQueryEncoder(path)


def test_output_size_that_contradicts_the_metadata_is_refused(tmp_path):
    path = build_float_model(tmp_path / "wrong_dim.onnx", batch="batch")
    model = onnx.load(str(path))
    helper.set_model_props(model, {**_metadata("float32_normalized", "fp32"), "embedding_dim": str(DIM + 1)})
    onnx.save(model, str(path))
    runtime = OnnxRuntimeQueryEncoder(path, threads=1)
    with pytest.raises(QueryEncoderError, match=r"wrong_dim\.onnx produced embeddings of shape \(2, 8\).*dim 9"):
        runtime.encode(queries(2))
