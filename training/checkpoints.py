"""Resumable training checkpoints: encoder weights + everything else needed to continue bit-exactly.

A checkpoint is a directory written atomically (``retrieval.atomic.atomic_directory``)::

    checkpoints/last/
        encoder/            an ordinary encoder checkpoint (``models.load_encoder`` opens it)
        <name>/             one more per extra trained encoder of the objective (a cohort's members)
        train_state.pt      optimiser, scheduler, objective state (loss parameters...), grad scaler, step, RNGs

``train_state.pt`` holds only tensors, numbers, strings and plain containers, and it is read with
``torch.load(weights_only=True)``: opening a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import WEIGHTS_FILE, CheckpointError, read_checkpoint_info, save_encoder, verify_weights
from models.encoder import Encoder
from retrieval.atomic import atomic_directory

__all__ = [
    "TRAIN_STATE_FILE",
    "TRAIN_STATE_VERSION",
    "capture_rng_state",
    "load_training_checkpoint",
    "restore_rng_state",
    "save_training_checkpoint",
]

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_VERSION = 1
ENCODER_DIR = "encoder"


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch (CPU and every CUDA device) as loadable data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    path: str | Path, encoders: Encoder | dict[str, Encoder], train_state: dict[str, Any]
) -> None:
    """Write the encoders (one sub-directory each) and ``train_state`` to ``path``, replacing it atomically."""
    named = _named(encoders)
    with atomic_directory(path) as tmp:
        for name, encoder in named.items():
            save_encoder(encoder, tmp / name)
        torch.save({"format_version": TRAIN_STATE_VERSION, **train_state}, tmp / TRAIN_STATE_FILE)


def _named(encoders: Encoder | dict[str, Encoder]) -> dict[str, Encoder]:
    return encoders if isinstance(encoders, dict) else {ENCODER_DIR: encoders}


def load_training_checkpoint(path: str | Path, encoders: Encoder | dict[str, Encoder]) -> dict[str, Any]:
    """Load the weights at ``path`` into the encoders (in place, by name) and return the train state.

    Raises:
        CheckpointError: missing or unreadable files, an unknown format version, or weights that do not
            fit ``encoder`` (the run's model config changed since the checkpoint was written).
    """
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / TRAIN_STATE_FILE
    named = _named(encoders)
    infos = {name: read_checkpoint_info(path / name) for name in named}
    for info in infos.values():
        verify_weights(info)  # a damaged checkpoint stops the resume with a message, not with silently wrong weights
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: {TRAIN_STATE_FILE} is missing")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        weights = {name: load_file(str(info.path / WEIGHTS_FILE)) for name, info in infos.items()}
    except Exception as exc:  # unpickling and safetensors raise many types for a damaged file
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != TRAIN_STATE_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file} has format version {found}; this version reads {TRAIN_STATE_VERSION}")
    for name, encoder in named.items():
        try:
            encoder.load_state_dict(weights[name], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"the checkpoint in {path / name} does not fit the configured model (did `model` change?): {exc}"
            ) from exc
    return state
