"""The JSON sidecar of a TensorRT engine file: what the engine is, since a serialised engine cannot say it.

A TensorRT engine ``X.engine`` (any name) is opaque bytes tied to one TensorRT version and GPU, so
the exporter writes ``X.engine.json`` beside it: the same query-encoder metadata as the ONNX file it was
built from (string values, as ``serving.onnx_metadata.encoder_metadata`` writes them), plus
``engine_format`` (``ENGINE_FORMAT``), ``tensorrt_version``, ``input_name``, ``output_name`` and
``profile`` (``{"min", "opt", "max"}``: the ``[batch, 3, S, S]`` input shapes the engine was built for),
the added keys as plain JSON values. Reading it needs neither TensorRT nor a GPU.

``engine_sha256`` is the SHA-256 of the engine file: an engine is opaque bytes, and a damaged one may
still deserialise and return wrong embeddings, so the runtime hashes the file before loading it
(``verify_engine_file``). Sidecars written before the key existed are accepted, with a warning.
The ONNX file's own ``file_sha256`` is not copied: it describes the ``.onnx``, not the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.atomic import write_file_atomically
from serving.model_checksum import CHECKSUM_KEY
from serving.onnx_metadata import REQUIRED_KEYS, OnnxEncoderInfo, OnnxMetadataError, parse_onnx_metadata
from serving.runtimes.base import QueryEncoderError

__all__ = [
    "ENGINE_FORMAT",
    "PROFILE_KEYS",
    "TensorRTEngineInfo",
    "TensorRTSidecarError",
    "engine_sidecar",
    "read_engine_sidecar",
    "sidecar_path",
    "verify_engine_file",
    "write_engine_sidecar",
]

logger = logging.getLogger(__name__)

#: Value of the sidecar's ``engine_format``; bump the suffix when the keys or the engine's I/O change.
ENGINE_FORMAT = "retrieval-query-encoder-tensorrt/1"
#: The shapes of an optimisation profile, smallest to largest batch.
PROFILE_KEYS = ("min", "opt", "max")


class TensorRTSidecarError(QueryEncoderError):
    """A TensorRT engine whose JSON sidecar is missing or malformed; the message names the sidecar."""


@dataclass(frozen=True)
class TensorRTEngineInfo:
    """A parsed engine sidecar.

    Attributes:
        encoder: the query-encoder metadata (ids, dim, preprocessing, input format, precision).
        tensorrt_version: the TensorRT version that built the engine (engines only load in that version).
        input_name: the engine's input tensor.
        output_name: the engine's output tensor (``(batch, dim)`` embeddings).
        profile: ``{"min"|"opt"|"max": (batch, 3, S, S)}``.
        engine_sha256: SHA-256 of the engine file; ``None`` in sidecars written before the key existed.
    """

    encoder: OnnxEncoderInfo
    tensorrt_version: str
    input_name: str
    output_name: str
    profile: dict[str, tuple[int, int, int, int]]
    engine_sha256: str | None = None

    @property
    def min_batch(self) -> int:
        return self.profile["min"][0]

    @property
    def max_batch(self) -> int:
        return self.profile["max"][0]


def sidecar_path(engine_path: str | Path) -> Path:
    """Where the sidecar of ``engine_path`` lives: the same name with ``.json`` appended."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def engine_sidecar(
    metadata: Mapping[str, str],
    tensorrt_version: str,
    input_name: str,
    output_name: str,
    profile: Mapping[str, Sequence[int]],
    engine: bytes | None = None,
) -> dict[str, Any]:
    """The sidecar content for an engine built from an ONNX file with ``metadata`` (its ``metadata_props``).

    Kept here, beside the reader, so that the exporter and the runtime cannot disagree on the format.
    ``engine`` is the serialised engine, whose SHA-256 the sidecar records; the exporter always gives it
    (without it the sidecar is one written before checksums, and the engine opens unchecked).
    """
    content = {
        **{key: str(value) for key, value in metadata.items() if key != CHECKSUM_KEY},
        "engine_format": ENGINE_FORMAT,
        "tensorrt_version": str(tensorrt_version),
        "input_name": str(input_name),
        "output_name": str(output_name),
        "profile": {key: [int(d) for d in profile[key]] for key in PROFILE_KEYS},
    }
    if engine is not None:
        content["engine_sha256"] = hashlib.sha256(engine).hexdigest()
    return content


def verify_engine_file(engine_path: str | Path, info: TensorRTEngineInfo) -> bytes:
    """Read the engine file and check it against the sidecar's ``engine_sha256``; return its bytes.

    Needs neither TensorRT nor a GPU. A sidecar without the key (written before it existed) passes with a warning.

    Raises:
        TensorRTSidecarError: the file cannot be read, or its hash differs (a damaged or replaced engine).
    """
    engine_path = Path(engine_path)
    try:
        data = engine_path.read_bytes()
    except OSError as exc:
        raise TensorRTSidecarError(f"cannot read TensorRT engine {engine_path}: {exc}") from exc
    if info.engine_sha256 is None:
        logger.warning(
            "TensorRT sidecar %s has no engine_sha256 (written before checksums); the engine cannot be checked: "
            "export it again",
            sidecar_path(engine_path),
        )
    elif hashlib.sha256(data).hexdigest() != info.engine_sha256:
        raise TensorRTSidecarError(
            f"{engine_path} does not match the checksum recorded in its sidecar {sidecar_path(engine_path).name} "
            "(engine_sha256): the engine is corrupt or was replaced; export it again"
        )
    return data


def write_engine_sidecar(engine_path: str | Path, sidecar: Mapping[str, Any]) -> Path:
    """Write ``sidecar`` (see ``engine_sidecar``) beside ``engine_path`` atomically; return the sidecar's path.

    The written file is read back with ``read_engine_sidecar``, so an invalid sidecar fails at export time,
    not when a server starts.

    Raises:
        TensorRTSidecarError: the content does not validate (the file is then left as written, for inspection).
    """
    path = sidecar_path(engine_path)
    write_file_atomically(path, json.dumps(dict(sidecar), indent=2) + "\n")
    read_engine_sidecar(engine_path)
    return path


def read_engine_sidecar(engine_path: str | Path) -> TensorRTEngineInfo:
    """Read and validate the sidecar of ``engine_path``.

    Raises:
        TensorRTSidecarError: no sidecar, not JSON, a wrong ``engine_format``, missing or malformed keys, or a
            profile that does not fit the metadata's input size.
    """
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise TensorRTSidecarError(
            f"TensorRT engine {engine_path} has no sidecar {path}; the sidecar (written by "
            "`retrieval export --format tensorrt`) says which encoder the engine is and how to feed it"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorRTSidecarError(f"TensorRT sidecar {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TensorRTSidecarError(f"TensorRT sidecar {path} must hold a JSON object, got {type(data).__name__}")
    if data.get("engine_format") != ENGINE_FORMAT:
        raise TensorRTSidecarError(
            f"TensorRT sidecar {path} has engine_format {data.get('engine_format')!r}; this release reads "
            f"{ENGINE_FORMAT!r}"
        )
    encoder = _encoder_info(data, path)
    tensorrt_version = _string(data, "tensorrt_version", path)
    input_name = _string(data, "input_name", path)
    output_name = _string(data, "output_name", path)
    profile = _profile(data.get("profile"), encoder.preprocess.input_size, path)
    engine_sha256 = data.get("engine_sha256")
    if engine_sha256 is not None and not (
        isinstance(engine_sha256, str) and len(engine_sha256) == 64 and set(engine_sha256) <= set("0123456789abcdef")
    ):
        raise TensorRTSidecarError(
            f"TensorRT sidecar {path}: 'engine_sha256' must be 64 lowercase hex digits, got {engine_sha256!r}"
        )
    return TensorRTEngineInfo(encoder, tensorrt_version, input_name, output_name, profile, engine_sha256)


def _encoder_info(data: Mapping[str, Any], path: Path) -> OnnxEncoderInfo:
    not_strings = [key for key in REQUIRED_KEYS if key in data and not isinstance(data[key], str)]
    if not_strings:
        raise TensorRTSidecarError(
            f"TensorRT sidecar {path}: {', '.join(not_strings)} must be strings, as in the ONNX metadata"
        )
    props = {key: value for key, value in data.items() if isinstance(value, str)}
    try:
        return parse_onnx_metadata(props, str(path))
    except OnnxMetadataError as exc:
        raise TensorRTSidecarError(str(exc)) from exc


def _string(data: Mapping[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise TensorRTSidecarError(f"TensorRT sidecar {path}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _profile(value: Any, input_size: int, path: Path) -> dict[str, tuple[int, int, int, int]]:
    if not isinstance(value, dict) or any(key not in value for key in PROFILE_KEYS):
        raise TensorRTSidecarError(
            f"TensorRT sidecar {path}: 'profile' must be an object with {', '.join(PROFILE_KEYS)} input shapes, "
            f"got {value!r}"
        )
    profile = {}
    for key in PROFILE_KEYS:
        shape = value[key]
        valid = (
            isinstance(shape, list)
            and len(shape) == 4
            and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            and shape[0] >= 1
            and shape[1:] == [3, input_size, input_size]
        )
        if not valid:
            raise TensorRTSidecarError(
                f"TensorRT sidecar {path}: profile {key!r} must be [batch, 3, {input_size}, {input_size}] "
                f"(batch >= 1, the input size from the metadata), got {shape!r}"
            )
        profile[key] = (shape[0], shape[1], shape[2], shape[3])
    batches = [profile[key][0] for key in PROFILE_KEYS]
    if batches != sorted(batches):
        raise TensorRTSidecarError(
            f"TensorRT sidecar {path}: profile batches must grow min <= opt <= max, got {batches}"
        )
    return profile
