"""What an exported ``.onnx`` query encoder says about itself, in its ``metadata_props``.

An ONNX file travels alone (to a phone, to another server), so it must carry everything a
runtime needs besides the graph: which encoder it is (so an index can refuse a wrong one),
which teacher it was distilled into, and the exact preprocessing. ONNX metadata values are
strings; structured values (mean, std, levels) are JSON, numbers are decimal text.

Every export also carries ``file_sha256``, a checksum of the whole file (``serving.model_checksum``):
``encoder_metadata`` writes its placeholder, the exporter seals the saved file, and runtimes verify it
when they open the file. Files exported before the key still open, with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from retrieval.data.preprocess import PreprocessConfig
from retrieval.errors import UserFacingError
from serving.model_checksum import CHECKSUM_KEY, PLACEHOLDER, verify_file

if TYPE_CHECKING:
    import onnx

    from models.encoder import Encoder

__all__ = [
    "INPUT_FORMATS",
    "ONNX_FORMAT",
    "PRECISIONS",
    "REQUIRED_KEYS",
    "OnnxEncoderInfo",
    "OnnxMetadataError",
    "OnnxReadError",
    "encoder_metadata",
    "parse_onnx_metadata",
    "read_onnx_metadata",
    "update_onnx_metadata",
]

#: Value of the ``format`` property; bump the suffix when the graph's inputs/outputs or the keys change.
ONNX_FORMAT = "retrieval-query-encoder-onnx/1"
#: Keys every exported file carries (``encoder_config``, the full config as JSON, is extra provenance).
REQUIRED_KEYS = (
    "format",
    "encoder_id",
    "teacher_id",
    "embedding_dim",
    "input_size",
    "mean",
    "std",
    "resize",
    "levels",
)
#: What the graph takes: ``float32_normalized`` is a ``(N, 3, H, W)`` float32 batch, already normalised with
#: ``mean``/``std``; ``uint8_rgb`` is a resized ``(1, 3, S, S)`` uint8 RGB image that the graph scales and
#: normalises itself (the mobile export). Files written before the key existed take the first.
INPUT_FORMATS = ("float32_normalized", "uint8_rgb")
#: Numeric precision of the weights: ``fp32``, ``fp16`` (inputs and outputs stay float32) or ``int8`` (QDQ).
PRECISIONS = ("fp32", "fp16", "int8")


class OnnxMetadataError(UserFacingError, ValueError):
    """An ONNX file without (or with malformed) query-encoder metadata; the message names the file."""


class OnnxReadError(OnnxMetadataError):
    """A file that does not parse as an ONNX model at all (truncated, damaged, or not ONNX)."""


@dataclass(frozen=True)
class OnnxEncoderInfo:
    """The parsed metadata of an exported query encoder.

    Attributes:
        encoder_id: id of the checkpoint the graph was exported from.
        teacher_id: id of the teacher a distilled student was trained against, else ``None``.
        embedding_dim: length of the output vectors.
        preprocess: input size, normalisation and resize policy, as in the checkpoint.
        levels: label levels the encoder was trained on, finest first.
        input_format: one of ``INPUT_FORMATS``.
        precision: one of ``PRECISIONS``.
    """

    encoder_id: str
    teacher_id: str | None
    embedding_dim: int
    preprocess: PreprocessConfig
    levels: tuple[str, ...]
    input_format: str = "float32_normalized"
    precision: str = "fp32"


def encoder_metadata(encoder: Encoder) -> dict[str, str]:
    """The ``metadata_props`` written into an export of ``encoder`` (which must have an ``encoder_id``)."""
    config = encoder.config
    pre = config.preprocess
    if not encoder.encoder_id:
        raise OnnxMetadataError(
            "the encoder has no encoder_id; save it with models.save_encoder (or load it from a checkpoint) "
            "before exporting, so that indexes can recognise the exported model"
        )
    return {
        "format": ONNX_FORMAT,
        "encoder_id": str(encoder.encoder_id),
        "teacher_id": config.teacher_id or "",
        "embedding_dim": str(int(config.embedding_dim)),
        "input_size": str(int(pre.input_size)),
        "mean": json.dumps([float(v) for v in pre.mean]),
        "std": json.dumps([float(v) for v in pre.std]),
        "resize": pre.resize,
        "levels": json.dumps(list(config.levels)),
        "input_format": "float32_normalized",
        "precision": "fp32",
        "encoder_config": config.model_dump_json(),
        CHECKSUM_KEY: PLACEHOLDER,  # replaced by the file's checksum once saved (serving.model_checksum.seal_file)
    }


def parse_onnx_metadata(props: Mapping[str, str], source: str) -> OnnxEncoderInfo:
    """Validate and parse ``metadata_props`` (as returned by ONNX Runtime's ``custom_metadata_map``).

    Args:
        props: the key/value string properties of the model.
        source: the file name, for error messages.

    Raises:
        OnnxMetadataError: a missing key, an unknown format, or a value that does not parse.
    """
    missing = [key for key in REQUIRED_KEYS if key not in props]
    if missing:
        raise OnnxMetadataError(
            f"{source} lacks query-encoder metadata ({', '.join(missing)}); it was not written by "
            "serving.export.export_onnx — export the checkpoint again with `retrieval export`"
        )
    if props["format"] != ONNX_FORMAT:
        raise OnnxMetadataError(f"{source} has format {props['format']!r}; this release reads {ONNX_FORMAT!r}")
    try:
        preprocess = PreprocessConfig(
            input_size=int(props["input_size"]),
            mean=tuple(_json(props, "mean")),
            std=tuple(_json(props, "std")),
            resize=props["resize"],
        )
        dim = int(props["embedding_dim"])
        levels = tuple(str(level) for level in _json(props, "levels"))
    except (ValueError, TypeError, ValidationError) as exc:
        raise OnnxMetadataError(f"{source}: malformed query-encoder metadata: {exc}") from exc
    if dim <= 0:
        raise OnnxMetadataError(f"{source}: embedding_dim must be positive, got {dim}")
    input_format = props.get("input_format", INPUT_FORMATS[0])
    precision = props.get("precision", PRECISIONS[0])
    if input_format not in INPUT_FORMATS:
        raise OnnxMetadataError(f"{source}: unknown input_format {input_format!r}; this release reads {INPUT_FORMATS}")
    if precision not in PRECISIONS:
        raise OnnxMetadataError(f"{source}: unknown precision {precision!r}; this release reads {PRECISIONS}")
    return OnnxEncoderInfo(
        encoder_id=props["encoder_id"],
        teacher_id=props["teacher_id"] or None,
        embedding_dim=dim,
        preprocess=preprocess,
        levels=levels,
        input_format=input_format,
        precision=precision,
    )


def read_onnx_metadata(path: str | Path, verify: bool = False) -> OnnxEncoderInfo:
    """Read the query-encoder metadata of an ``.onnx`` file without building a session.

    Args:
        path: the ``.onnx`` file.
        verify: also check the file against its ``file_sha256`` (one more pass over the bytes; a file without
            the key passes with a warning).

    Raises:
        FileNotFoundError: no such file.
        OnnxReadError: not a readable ONNX model.
        OnnxMetadataError: no valid metadata.
        serving.model_checksum.ModelChecksumError: with ``verify``, bytes that do not match the checksum.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise OnnxReadError(
            f"cannot read ONNX model {path} (truncated, damaged or not ONNX): {' '.join(str(exc).split())}"
        ) from exc
    props = {prop.key: prop.value for prop in model.metadata_props}
    if verify:
        verify_file(path, props.get(CHECKSUM_KEY))
    return parse_onnx_metadata(props, str(path))


def update_onnx_metadata(model: onnx.ModelProto, updates: Mapping[str, str], source: str) -> OnnxEncoderInfo:
    """Set ``updates`` in the ``metadata_props`` of ``model`` (in memory), keeping the other keys, and validate.

    A converted export (fp16, int8 mobile) is the same encoder with another precision or input format; it
    keeps every key of the float export and changes only those.

    Raises:
        OnnxMetadataError: the result is not valid query-encoder metadata (e.g. an unknown precision).
    """
    props = {prop.key: prop.value for prop in model.metadata_props} | dict(updates)
    info = parse_onnx_metadata(props, source)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return info


def _json(props: Mapping[str, str], key: str) -> Any:
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key!r} is not valid JSON ({exc})") from exc
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a JSON list, got {props[key]!r}")
    return value
