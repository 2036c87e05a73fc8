"""Choosing a runtime through the registry: by what a path is, never by its suffix."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

from retrieval.registry import UnknownNameError
from serving.onnx_metadata import read_onnx_metadata
from serving.runtimes import (
    RUNTIMES,
    SELECTION_ORDER,
    OnnxRuntimeQueryEncoder,
    QueryEncoderError,
    TorchQueryEncoder,
    open_query_encoder,
    runtime_for,
)
from serving.runtimes.selection import selection_order
from serving.runtimes.tensorrt_sidecar import engine_sidecar, write_engine_sidecar
from serving.runtimes.torch_runtime import CHECKPOINT_FILES


@pytest.fixture(scope="module")
def candidates(tiny_checkpoint, serving_onnx, tmp_path_factory) -> dict[str, Path]:
    """One path of every kind, under names that would mislead a suffix-based choice."""
    root = tmp_path_factory.mktemp("candidates")
    onnx_copy = root / "model.bin"  # an ONNX file without the .onnx suffix
    shutil.copy(serving_onnx, onnx_copy)
    ort_copy = root / "model.onnx.mobile"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(ort_copy)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(serving_onnx), options, providers=["CPUExecutionProvider"])
    engine = root / "encoder.onnx"  # an engine named like an ONNX file: its sidecar decides
    engine.write_bytes(b"\x00not-an-onnx-model")
    info = read_onnx_metadata(serving_onnx)
    size = info.preprocess.input_size
    metadata = {
        "format": "retrieval-query-encoder-onnx/1",
        "encoder_id": info.encoder_id,
        "teacher_id": "",
        "embedding_dim": str(info.embedding_dim),
        "input_size": str(size),
        "mean": str(list(info.preprocess.mean)),
        "std": str(list(info.preprocess.std)),
        "resize": info.preprocess.resize,
        "levels": '["fine"]',
    }
    shapes = {key: [b, 3, size, size] for key, b in (("min", 1), ("opt", 4), ("max", 8))}
    write_engine_sidecar(engine, engine_sidecar(metadata, "10.9.0", "images", "embeddings", shapes))
    checkpoint_dir = root / "checkpoint.onnx"  # a checkpoint directory with a misleading name
    shutil.copytree(tiny_checkpoint, checkpoint_dir)
    garbage = root / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not really a protobuf")
    half_checkpoint = root / "half_checkpoint"
    half_checkpoint.mkdir()
    (half_checkpoint / "config.json").write_text("{}")
    return {
        "checkpoint": checkpoint_dir,
        "onnx": onnx_copy,
        "ort": ort_copy,
        "engine": engine,
        "garbage": garbage,
        "half_checkpoint": half_checkpoint,
    }


def test_selection_order_is_documented_and_complete():
    assert SELECTION_ORDER == ("tensorrt", "onnxruntime", "torch")
    assert selection_order() == ["tensorrt", "onnxruntime", "torch"]
    assert sorted(selection_order()) == RUNTIMES.names()


@pytest.mark.parametrize(
    ("kind", "runtime"),
    [("checkpoint", "torch"), ("onnx", "onnxruntime"), ("ort", "onnxruntime"), ("engine", "tensorrt")],
)
def test_each_kind_goes_to_its_runtime(candidates, kind, runtime):
    path = candidates[kind]
    assert runtime_for(path) == runtime
    assert [name for name in RUNTIMES.names() if RUNTIMES.get(name).accepts(path)] == [runtime]


def test_opened_by_content(candidates, tiny_checkpoint):
    onnx_rt = open_query_encoder(candidates["onnx"], threads=1)
    ort_rt = open_query_encoder(candidates["ort"], threads=1)
    torch_rt = open_query_encoder(candidates["checkpoint"], device="cpu")
    assert isinstance(onnx_rt, OnnxRuntimeQueryEncoder) and isinstance(ort_rt, OnnxRuntimeQueryEncoder)
    assert isinstance(torch_rt, TorchQueryEncoder)
    assert onnx_rt.encoder_id == ort_rt.encoder_id == torch_rt.encoder_id


def test_garbage_file_names_the_path_and_every_runtime(candidates):
    with pytest.raises(QueryEncoderError) as caught:
        open_query_encoder(candidates["garbage"])
    message = str(caught.value)
    assert message.startswith(f"no query-encoder runtime can open {candidates['garbage']}:")
    assert "tensorrt expects a TensorRT engine file with its JSON sidecar" in message
    assert "here: no sidecar garbage.onnx.json" in message
    assert "onnxruntime expects an .onnx file exported by `retrieval export`" in message
    assert "here: cannot read ONNX model garbage.onnx" in message
    assert "torch expects an encoder checkpoint directory (config.json + model.safetensors); here: not a directory" in (
        message
    )


def test_directory_without_weights(candidates):
    with pytest.raises(QueryEncoderError, match=r"torch expects .*here: the directory lacks model\.safetensors"):
        open_query_encoder(candidates["half_checkpoint"])


def test_forced_runtime_reports_its_own_error(candidates):
    from models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        open_query_encoder(candidates["onnx"], runtime="torch")
    with pytest.raises(QueryEncoderError, match=r"ONNX Runtime cannot load .*encoder\.onnx"):
        open_query_encoder(candidates["engine"], runtime="onnxruntime")
    forced = open_query_encoder(candidates["onnx"], runtime="onnxruntime", threads=1)
    assert isinstance(forced, OnnxRuntimeQueryEncoder)


def test_unknown_runtime_lists_the_valid_names(candidates, tmp_path):
    with pytest.raises(
        UnknownNameError, match="unknown runtime 'tensorflow'; valid names: onnxruntime, tensorrt, torch"
    ):
        open_query_encoder(candidates["onnx"], runtime="tensorflow")
    with pytest.raises(UnknownNameError, match="valid names"):  # the name is checked before the path
        open_query_encoder(tmp_path / "missing", runtime="tensorflow")
    with pytest.raises(QueryEncoderError, match=r"query encoder not found: .*missing"):
        open_query_encoder(tmp_path / "missing", runtime="torch")


def test_checkpoint_file_names_match_the_checkpoint_module():
    """The torch probe repeats the names to avoid importing torch; they must not drift."""
    from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    assert (CONFIG_FILE, WEIGHTS_FILE) == CHECKPOINT_FILES
