"""Self-describing encoder checkpoints: a directory with ``config.json`` and ``model.safetensors``.

``load_encoder(path)`` rebuilds the model from these two files alone. Weights are stored
as safetensors, which holds tensors only, so opening a checkpoint never runs code. The
encoder id is a content hash of the weights: an index records the id of the encoder that
built it, and a query encoder (or a distilled student, through ``teacher_id``) must match it.

Integrity: ``config.json`` records the full SHA-256 of ``model.safetensors`` (``weights_sha256``), and
``load_encoder`` recomputes it before building the model. Changed bytes in the weights often still load
(safetensors checks the header, not the values) and then give wrong or NaN embeddings without a word;
with the checksum they give one ``CheckpointError`` naming the file. Checkpoints written before the key
existed are checked against their encoder id instead, which is the first 16 hex digits of the same hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from models.devices import resolve_device
from models.encoder import Encoder, EncoderConfig, create_encoder
from models.ensemble import EnsembleEncoder
from retrieval.atomic import atomic_directory
from retrieval.errors import UserFacingError

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "load_encoder",
    "load_weights_into",
    "read_checkpoint_info",
    "save_encoder",
    "verify_weights",
]

CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Length of an encoder id: the first hex digits of the weights file's SHA-256.
ENCODER_ID_LENGTH = 16
_HEX_DIGITS = frozenset("0123456789abcdef")


class CheckpointError(UserFacingError, ValueError):
    """A checkpoint that is missing, corrupt, or of an unsupported format."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's ``config.json`` says, read without building the model."""

    path: Path
    config: EncoderConfig
    encoder_id: str
    #: SHA-256 of ``model.safetensors`` as recorded at save time; ``None`` in checkpoints older than the key.
    weights_sha256: str | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_encoder(encoder: Encoder, path: str | Path) -> str:
    """Write ``encoder`` to the checkpoint directory ``path`` atomically; return its encoder id."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        weights_sha256 = _sha256(tmp / WEIGHTS_FILE)
        encoder_id = weights_sha256[:ENCODER_ID_LENGTH]
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "encoder_id": encoder_id,
            "weights_sha256": weights_sha256,
            "config": json.loads(encoder.config.model_dump_json()),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    encoder.encoder_id = encoder_id
    return encoder_id


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Parse and validate a checkpoint's ``config.json``.

    Reads ``config.json`` only (the weights are checked by ``verify_weights``, which ``load_encoder`` calls).

    Raises:
        CheckpointError: not a checkpoint directory, unreadable JSON, an unknown format version, or a
            ``weights_sha256`` that is not a SHA-256 or disagrees with the encoder id.
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{path} is not an encoder checkpoint (expected a directory with {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        payload = json.loads(config_file.read_text())
        version = payload["format_version"]
        encoder_id = payload["encoder_id"]
        weights_sha256 = payload.get("weights_sha256")
        config = EncoderConfig.model_validate(payload["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValidationError) as exc:
        raise CheckpointError(f"{config_file} is not a valid checkpoint config: {_one_line(exc)}") from exc
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this version reads {CHECKPOINT_FORMAT_VERSION}"
        )
    if weights_sha256 is not None:
        if not _is_hex(weights_sha256, 64):
            raise CheckpointError(
                f"{config_file}: weights_sha256 must be 64 lowercase hex digits, got {weights_sha256!r}"
            )
        if encoder_id != weights_sha256[:ENCODER_ID_LENGTH]:
            raise CheckpointError(
                f"{config_file} is corrupt or was edited: its encoder_id {encoder_id!r} is not the start of its "
                f"weights_sha256 {weights_sha256[:ENCODER_ID_LENGTH]}..."
            )
    return CheckpointInfo(path=path, config=config, encoder_id=encoder_id, weights_sha256=weights_sha256)


def verify_weights(info: CheckpointInfo) -> None:
    """Check that ``model.safetensors`` is the file the checkpoint's ``config.json`` was written with.

    The weights file is hashed in full (about 0.1 s per 100 MB) and compared with ``weights_sha256``, or, in a
    checkpoint written before that key, with the encoder id (its first 16 hex digits). An id that is not 16 hex
    digits cannot be a hash and is left unchecked.

    Raises:
        CheckpointError: the file's hash differs; the message names the file.
    """
    weights = info.path / WEIGHTS_FILE
    try:
        actual = _sha256(weights)
    except OSError as exc:
        raise CheckpointError(f"cannot read weights {weights}: {exc}") from exc
    if info.weights_sha256 is not None:
        if actual != info.weights_sha256:
            raise CheckpointError(
                f"{weights} does not match the checksum recorded in {CONFIG_FILE}: the file is corrupt or was "
                f"replaced (SHA-256 {actual[:16]}..., expected {info.weights_sha256[:16]}...); copy the checkpoint "
                "again or retrain it"
            )
    elif _is_hex(info.encoder_id, ENCODER_ID_LENGTH) and actual[:ENCODER_ID_LENGTH] != info.encoder_id:
        raise CheckpointError(
            f"{weights} does not match the encoder id {info.encoder_id} recorded in {CONFIG_FILE} (the start of the "
            f"weights' SHA-256, here {actual[:ENCODER_ID_LENGTH]}): the file is corrupt or was replaced; copy the "
            "checkpoint again or retrain it"
        )


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX_DIGITS


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pydantic's validation errors span several)."""
    return " ".join(str(exc).split())


def load_weights_into(encoder: Encoder, path: str | Path) -> CheckpointInfo:
    """Copy the verified weights of the checkpoint at ``path`` into ``encoder`` (every layer, strictly).

    What ``retrieval train --init-from`` starts from: the encoder was built from the checkpoint's own
    architecture (``read_checkpoint_info(path).config``), so every tensor must fit; the encoder keeps its
    config and mode. The weights file is checked against ``weights_sha256`` first, as ``load_encoder`` does.

    Raises:
        CheckpointError: see ``read_checkpoint_info`` and ``verify_weights``; also weights that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_checkpoint_info(path)
    verify_weights(info)
    weights = info.path / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights {weights}: {_one_line(exc)}") from exc
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {weights} do not fit the encoder being trained: {_one_line(exc)}") from exc
    return info


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Rebuild an encoder from its checkpoint directory, in eval mode, with ``encoder_id`` set.

    Raises:
        CheckpointError: see ``read_checkpoint_info`` and ``verify_weights`` (corrupt or replaced weights);
            also weights that do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = resolve_device(device)
    info = read_checkpoint_info(path)
    verify_weights(info)
    weights = info.path / WEIGHTS_FILE
    encoder = create_encoder(_without_pretrained(info.config))  # an ensemble when the config has members
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights {weights}: {_one_line(exc)}") from exc
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {weights} do not fit the architecture in its config: {_one_line(exc)}"
        ) from exc
    _restore_config(encoder, info.config)
    encoder.encoder_id = info.encoder_id
    return encoder.to(device).eval()


def _without_pretrained(config: EncoderConfig) -> EncoderConfig:
    """``config`` (and its ensemble members) with ``pretrained`` off: the checkpoint holds every weight."""
    members = [member.model_copy(update={"pretrained": False}) for member in config.members]
    return config.model_copy(update={"pretrained": False, "members": members})


def _restore_config(encoder: Encoder, config: EncoderConfig) -> None:
    """Give a loaded encoder (and an ensemble's members) the checkpoint's own config, ``pretrained`` included."""
    encoder.config = config
    if isinstance(encoder, EnsembleEncoder):
        for member, member_config in zip(encoder.members, config.members, strict=True):
            member.config = member_config
