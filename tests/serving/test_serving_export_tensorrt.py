"""TensorRT export: a clear error where TensorRT or a GPU is missing, the sidecar contract, the batch range."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import onnx
import pytest
from typer.testing import CliRunner

from retrieval.cli.main import app as cli
from serving.export import ExportError
from serving.export_tensorrt import (
    TensorRTUnavailableError,
    batch_profile,
    export_tensorrt,
)
from serving.runtimes.tensorrt_sidecar import (
    ENGINE_FORMAT,
    engine_sidecar,
    read_engine_sidecar,
    sidecar_path,
    write_engine_sidecar,
)


def _has_gpu_tensorrt() -> bool:
    import torch

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


needs_no_tensorrt = pytest.mark.skipif(_has_gpu_tensorrt(), reason="TensorRT and a GPU are present here")


@needs_no_tensorrt
def test_missing_tensorrt_or_gpu_is_a_clear_error_and_writes_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(TensorRTUnavailableError, match=r'pip install -e "\.\[tensorrt\]".*NVIDIA GPU') as caught:
        export_tensorrt(tiny_checkpoint, tmp_path / "query.engine")
    assert "--format onnx" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@needs_no_tensorrt
def test_cli_tensorrt_without_tensorrt_exits_2_with_the_hint(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(
        cli, ["export", "--encoder", str(tiny_checkpoint), "--out", str(tmp_path / "q.engine"), "--format", "tensorrt"]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "tensorrt" in result.output
    assert list(tmp_path.iterdir()) == []


def test_sidecar_round_trips_through_the_runtime_reader(serving_onnx, tmp_path):
    metadata = {prop.key: prop.value for prop in onnx.load(str(serving_onnx)).metadata_props}
    engine = tmp_path / "query.engine"
    engine.write_bytes(b"not a real engine; the sidecar reader never opens it")
    profile = batch_profile(1, 8, 32, int(metadata["input_size"]))
    content = engine_sidecar(metadata, "10.9.0", "images", "embeddings", profile, engine.read_bytes())
    path = write_engine_sidecar(engine, content)
    assert path == sidecar_path(engine) == tmp_path / "query.engine.json"
    data = json.loads(path.read_text())
    assert data["engine_format"] == ENGINE_FORMAT and data["profile"]["max"] == [32, 3, 32, 32]
    assert "file_sha256" not in data  # the .onnx's checksum; the engine has its own
    assert data["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert all(isinstance(data[key], str) for key in metadata if key != "file_sha256")
    info = read_engine_sidecar(engine)
    assert info.encoder.encoder_id == metadata["encoder_id"] and info.encoder.precision == "fp32"
    assert (info.min_batch, info.max_batch, info.input_name, info.output_name) == (1, 32, "images", "embeddings")
    assert info.tensorrt_version == "10.9.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query.engine", "query.engine.json"]


@pytest.mark.parametrize(("low", "opt", "high"), [(0, 1, 2), (4, 2, 8), (1, 16, 8)])
def test_batch_range_must_grow(low, opt, high):
    with pytest.raises(ExportError, match="1 <= --min-batch <= --opt-batch <= --max-batch"):
        batch_profile(low, opt, high, 224)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu_tensorrt(), reason="needs TensorRT and a CUDA device")
@pytest.mark.parametrize("fp16", [False, True])
def test_engine_builds_and_matches_onnx(tiny_checkpoint, tmp_path, fp16):
    built = export_tensorrt(
        tiny_checkpoint, tmp_path / "query.engine", fp16=fp16, min_batch=1, opt_batch=4, max_batch=8
    )
    assert built.engine_min_cosine >= 0.999
    info = read_engine_sidecar(built.path)
    assert info.encoder.precision == ("fp16" if fp16 else "fp32") and info.max_batch == 8
