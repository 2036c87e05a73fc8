"""Exported models cannot be silently corrupt: every runtime checks the file's checksum when it opens it.

Bytes flipped inside an ONNX file's weights still load in ONNX Runtime; the model then embeds every query
wrongly (or as NaN). These tests damage real exported files and open them with the real runtimes and the
real search engine: each damage must give one error line naming the file, never a model that answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from file_damage import flip_bytes, truncate

from retrieval.errors import UserFacingError
from serving.engine import SearchEngine
from serving.model_checksum import (
    CHECKSUM_KEY,
    ModelChecksumError,
    checksum_sidecar_path,
    file_digest,
    verify_file,
    write_checksum_sidecar,
)
from serving.onnx_metadata import read_onnx_metadata
from serving.runtimes import OnnxRuntimeQueryEncoder, open_query_encoder
from serving.runtimes.tensorrt_runtime import TensorRTQueryEncoder
from serving.runtimes.tensorrt_sidecar import TensorRTSidecarError, engine_sidecar, write_engine_sidecar


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _one_line_naming(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert isinstance(exc, UserFacingError), f"{type(exc).__name__}: {message}"
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.fixture
def onnx_copy(serving_onnx, tmp_path) -> Path:
    return Path(shutil.copy(serving_onnx, tmp_path / "encoder.onnx"))


def test_export_carries_a_checksum_of_the_whole_file(serving_onnx):
    recorded = _props(serving_onnx)[CHECKSUM_KEY]
    assert len(recorded) == 64 and recorded == file_digest(serving_onnx.read_bytes(), recorded)
    assert verify_file(serving_onnx, recorded) is True
    read_onnx_metadata(serving_onnx, verify=True)
    assert OnnxRuntimeQueryEncoder(serving_onnx, threads=1).encoder_id == read_onnx_metadata(serving_onnx).encoder_id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flipped_onnx_bytes_never_open(onnx_copy, serving_index, seed):
    flip_bytes(onnx_copy, 100, seed)
    with pytest.raises(UserFacingError) as caught:
        SearchEngine.open(serving_index, onnx_copy, threads=1)
    _one_line_naming(caught.value, onnx_copy)


def test_flipped_weight_bytes_fail_the_checksum(onnx_copy):
    """Bytes changed only inside the largest initializer: the file still parses, only the checksum can tell."""
    model = onnx.load(str(onnx_copy))
    largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = onnx_copy.read_bytes()
    start = data.index(largest.raw_data)
    damaged = bytearray(data)
    for position in range(start + 16, start + len(largest.raw_data), max(1, len(largest.raw_data) // 100))[:100]:
        damaged[position] ^= 0x40
    onnx_copy.write_bytes(bytes(damaged))
    onnx.load(str(onnx_copy))  # still a valid model
    with pytest.raises(ModelChecksumError) as caught:
        OnnxRuntimeQueryEncoder(onnx_copy, threads=1)
    assert "does not match the checksum recorded in its metadata" in _one_line_naming(caught.value, onnx_copy)


def test_truncated_onnx_fails_in_one_line(onnx_copy, serving_index):
    truncate(onnx_copy)
    with pytest.raises(UserFacingError) as caught:
        SearchEngine.open(serving_index, onnx_copy, threads=1)
    assert "truncated, damaged or not ONNX" in _one_line_naming(caught.value, onnx_copy)


def test_edited_metadata_is_caught(onnx_copy):
    """A changed preprocessing value would shift every embedding: it is inside the checksum too."""
    model = onnx.load(str(onnx_copy))
    for prop in model.metadata_props:
        if prop.key == "mean":
            prop.value = json.dumps([0.4, 0.4, 0.4])
    onnx.save(model, str(onnx_copy))
    with pytest.raises(ModelChecksumError):
        OnnxRuntimeQueryEncoder(onnx_copy, threads=1)


def test_exports_without_a_checksum_open_with_a_warning(onnx_copy, caplog):
    model = onnx.load(str(onnx_copy))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != CHECKSUM_KEY]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(kept))
    onnx.save(model, str(onnx_copy))
    with caplog.at_level(logging.WARNING, logger="serving.model_checksum"):
        encoder = OnnxRuntimeQueryEncoder(onnx_copy, threads=1)
    assert encoder.encoder_id and "carries no file_sha256" in caplog.text


@pytest.fixture
def ort_copy(serving_onnx, tmp_path) -> Path:
    """An ORT-format copy of the export, as the mobile export and ``convert_onnx_models_to_ort`` make them."""
    path = tmp_path / "encoder.ort"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(serving_onnx), options, providers=["CPUExecutionProvider"])
    return path


def test_ort_files_are_checked_against_their_sidecar(ort_copy, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.model_checksum"):
        OnnxRuntimeQueryEncoder(ort_copy, threads=1)  # a copy made by hand: no sidecar, a warning
    assert "has no checksum sidecar" in caplog.text
    sidecar = write_checksum_sidecar(ort_copy)
    assert sidecar == checksum_sidecar_path(ort_copy)
    assert sidecar.read_text() == f"{hashlib.sha256(ort_copy.read_bytes()).hexdigest()}  encoder.ort\n"
    OnnxRuntimeQueryEncoder(ort_copy, threads=1)
    data = bytearray(ort_copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    ort_copy.write_bytes(bytes(data))
    with pytest.raises(UserFacingError) as caught:
        open_query_encoder(ort_copy, threads=1)
    _one_line_naming(caught.value, ort_copy)


def test_tensorrt_engine_checksum_is_checked_before_tensorrt_is_needed(serving_onnx, tmp_path):
    """The sidecar records the engine's SHA-256; a damaged engine is named even on a host without TensorRT."""
    engine = tmp_path / "query.engine"
    engine.write_bytes(b"serialised engine bytes stand-in " * 100)
    metadata = _props(serving_onnx)
    size = int(metadata["input_size"])
    profile = {key: [b, 3, size, size] for key, b in (("min", 1), ("opt", 4), ("max", 8))}
    write_engine_sidecar(
        engine, engine_sidecar(metadata, "10.9.0", "images", "embeddings", profile, engine.read_bytes())
    )
    flip_bytes(engine, 100, seed=1)
    with pytest.raises(TensorRTSidecarError) as caught:
        TensorRTQueryEncoder(engine, device="cuda")
    assert "does not match the checksum recorded in its sidecar" in _one_line_naming(caught.value, engine)
