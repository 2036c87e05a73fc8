"""The TensorRT runtime's sidecar parsing and its errors where TensorRT or a GPU is missing.

Running an engine needs TensorRT and a CUDA device; these tests cover what must hold everywhere: a
sidecar is validated before anything else, a bad one is named with its problem, and a machine without
TensorRT or CUDA gets an error saying what is missing and how to get it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving.onnx_metadata import ONNX_FORMAT
from serving.runtimes import ENGINE_FORMAT, QueryEncoderError, TensorRTQueryEncoder, open_query_encoder, runtime_for
from serving.runtimes.tensorrt_runtime import tensorrt_problems
from serving.runtimes.tensorrt_sidecar import (
    TensorRTSidecarError,
    engine_sidecar,
    read_engine_sidecar,
    sidecar_path,
    write_engine_sidecar,
)

METADATA = {
    "format": ONNX_FORMAT,
    "encoder_id": "abc123",
    "teacher_id": "teacher9",
    "embedding_dim": "32",
    "input_size": "64",
    "mean": "[0.485, 0.456, 0.406]",
    "std": "[0.229, 0.224, 0.225]",
    "resize": "squash",
    "levels": '["fine", "middle"]',
    "input_format": "float32_normalized",
    "precision": "fp16",
}
PROFILE = {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [32, 3, 64, 64]}


def _sidecar(**changes: Any) -> dict[str, Any]:
    content = engine_sidecar(METADATA, "10.9.0", "images", "embeddings", PROFILE)
    for key, value in changes.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    return content


def _engine(tmp_path: Path, content: Any | None = None, raw: str | None = None) -> Path:
    """A stand-in engine file (bytes TensorRT would reject) with the given sidecar written beside it."""
    engine = tmp_path / "encoder.plan"
    engine.write_bytes(b"\x00serialised-engine-bytes")
    if raw is not None:
        sidecar_path(engine).write_text(raw)
    elif content is not None:
        sidecar_path(engine).write_text(json.dumps(content))
    return engine


def test_sidecar_round_trip(tmp_path):
    engine = _engine(tmp_path)
    written = write_engine_sidecar(engine, _sidecar())
    assert written == tmp_path / "encoder.plan.json"
    stored = json.loads(written.read_text())
    assert stored["engine_format"] == ENGINE_FORMAT and stored["profile"]["max"] == [32, 3, 64, 64]
    info = read_engine_sidecar(engine)
    assert (info.encoder.encoder_id, info.encoder.teacher_id, info.encoder.embedding_dim) == ("abc123", "teacher9", 32)
    assert info.encoder.preprocess.input_size == 64 and info.encoder.precision == "fp16"
    assert (info.tensorrt_version, info.input_name, info.output_name) == ("10.9.0", "images", "embeddings")
    assert (info.min_batch, info.max_batch) == (1, 32)
    assert runtime_for(engine) == "tensorrt"  # any file name: chosen by its sidecar


BAD_SIDECARS = [
    ("not json", None, "{not json", r"not readable JSON"),
    ("array", [1, 2], None, r"must hold a JSON object, got list"),
    ("format", _sidecar(engine_format="retrieval-query-encoder-tensorrt/0"), None, r"engine_format .*/0'"),
    ("no format", _sidecar(engine_format=None), None, r"engine_format None"),
    ("missing key", _sidecar(encoder_id=None), None, r"lacks query-encoder metadata \(encoder_id\)"),
    ("number not string", _sidecar(embedding_dim=32), None, r"embedding_dim must be strings"),
    ("bad levels", _sidecar(levels="fine"), None, r"malformed query-encoder metadata"),
    ("no input name", _sidecar(input_name=None), None, r"'input_name' must be a non-empty string"),
    ("empty output", _sidecar(output_name=""), None, r"'output_name' must be a non-empty string"),
    ("no version", _sidecar(tensorrt_version=None), None, r"'tensorrt_version' must be"),
    ("no profile", _sidecar(profile=None), None, r"'profile' must be an object with min, opt, max"),
    ("profile size", _sidecar(profile={**PROFILE, "opt": [8, 3, 32, 32]}), None, r"'opt' must be \[batch, 3, 64, 64\]"),
    ("profile rank", _sidecar(profile={**PROFILE, "min": [1, 3, 64]}), None, r"'min' must be"),
    ("zero batch", _sidecar(profile={**PROFILE, "min": [0, 3, 64, 64]}), None, r"batch >= 1"),
    ("order", _sidecar(profile={**PROFILE, "max": [4, 3, 64, 64]}), None, r"min <= opt <= max, got \[1, 8, 4\]"),
]


@pytest.mark.parametrize(
    ("content", "raw", "message"), [case[1:] for case in BAD_SIDECARS], ids=[c[0] for c in BAD_SIDECARS]
)
def test_malformed_sidecar_is_named_with_its_problem(tmp_path, content, raw, message):
    engine = _engine(tmp_path, content, raw)
    with pytest.raises(TensorRTSidecarError, match=message) as caught:
        read_engine_sidecar(engine)
    assert "encoder.plan.json" in str(caught.value)
    with pytest.raises(TensorRTSidecarError, match=message):  # before any TensorRT or CUDA check
        open_query_encoder(engine, runtime="tensorrt")
    with pytest.raises(QueryEncoderError, match=r"(?s)no query-encoder runtime can open .*tensorrt expects"):
        open_query_encoder(engine)


def test_write_refuses_an_invalid_sidecar(tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(TensorRTSidecarError, match="profile"):
        write_engine_sidecar(engine, _sidecar(profile={**PROFILE, "max": [0, 3, 64, 64]}))


def test_missing_sidecar(tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(TensorRTSidecarError, match=r"encoder\.plan has no sidecar .*encoder\.plan\.json"):
        TensorRTQueryEncoder(engine)
    with pytest.raises(
        QueryEncoderError, match=r"tensorrt expects a TensorRT engine .*here: no sidecar encoder\.plan\.json"
    ):
        open_query_encoder(engine)


def test_missing_engine(tmp_path):
    with pytest.raises(QueryEncoderError, match=r"TensorRT engine .*gone\.engine not found"):
        TensorRTQueryEncoder(tmp_path / "gone.engine")


@pytest.mark.skipif(not tensorrt_problems(), reason="TensorRT and a CUDA device are present")
def test_no_tensorrt_or_gpu_says_what_is_missing_and_how_to_get_it(tmp_path):
    engine = _engine(tmp_path, _sidecar())
    with pytest.raises(QueryEncoderError) as caught:
        open_query_encoder(engine)
    message = str(caught.value)
    assert f"cannot run TensorRT engine {engine} here" in message
    for problem in tensorrt_problems():
        assert problem in message
    assert 'pip install -e ".[tensorrt]"' in message and "GPU machine" in message
    assert "or search with the .onnx file" in message


def test_problems_name_the_package_and_the_device():
    """On this CPU machine both are missing; where they exist the list is empty."""
    problems = tensorrt_problems()
    try:
        import tensorrt  # noqa: F401

        has_tensorrt = True
    except ImportError:
        has_tensorrt = False
    import torch

    assert any("tensorrt Python package" in p for p in problems) == (not has_tensorrt)
    assert any("no CUDA device" in p for p in problems) == (not torch.cuda.is_available())
