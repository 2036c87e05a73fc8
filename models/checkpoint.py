"""Self-describing encoder checkpoints: a directory with ``config.json`` and ``model.safetensors``.

``load_encoder(path)`` rebuilds the model from these two files alone. Weights are stored
as safetensors, which holds tensors only, so opening a checkpoint never runs code. The
encoder id is a content hash of the weights: an index records the id of the encoder that
built it, and a query encoder (or a distilled student, through ``teacher_id``) must match it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from models.devices import resolve_device
from models.encoder import Encoder, EncoderConfig
from retrieval.atomic import atomic_directory
from retrieval.errors import UserFacingError

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "load_encoder",
    "read_checkpoint_info",
    "save_encoder",
]

CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(UserFacingError, ValueError):
    """A checkpoint that is missing, corrupt, or of an unsupported format."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's ``config.json`` says, read without building the model."""

    path: Path
    config: EncoderConfig
    encoder_id: str


def _weights_id(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_encoder(encoder: Encoder, path: str | Path) -> str:
    """Write ``encoder`` to the checkpoint directory ``path`` atomically; return its encoder id."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        encoder_id = _weights_id(tmp / WEIGHTS_FILE)
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "encoder_id": encoder_id,
            "config": json.loads(encoder.config.model_dump_json()),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    encoder.encoder_id = encoder_id
    return encoder_id


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Parse and validate a checkpoint's ``config.json``.

    Raises:
        CheckpointError: not a checkpoint directory, unreadable JSON, or an unknown format version.
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
        config = EncoderConfig.model_validate(payload["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise CheckpointError(f"{config_file} is not a valid checkpoint config: {exc}") from exc
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this version reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return CheckpointInfo(path=path, config=config, encoder_id=encoder_id)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Rebuild an encoder from its checkpoint directory, in eval mode, with ``encoder_id`` set.

    Raises:
        CheckpointError: see ``read_checkpoint_info``; also weights that do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = resolve_device(device)
    info = read_checkpoint_info(path)
    weights = info.path / WEIGHTS_FILE
    config = info.config.model_copy(update={"pretrained": False})  # the checkpoint holds the weights
    encoder = Encoder(config)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights {weights}: {exc}") from exc
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {weights} do not fit the architecture in its config: {exc}") from exc
    encoder.config = info.config
    encoder.encoder_id = info.encoder_id
    return encoder.to(device).eval()
