"""A damaged training checkpoint stops the resume with a message naming the file, never with wrong weights."""

from __future__ import annotations

import pytest
import torch

from models import Encoder
from models.checkpoint import CheckpointError
from training.checkpoints import ENCODER_DIR, WEIGHTS_FILE, load_training_checkpoint, save_training_checkpoint


def test_flipped_bytes_in_the_checkpoint_weights_are_refused(tiny_encoder_config, tmp_path):
    torch.manual_seed(0)
    encoder = Encoder(tiny_encoder_config)
    save_training_checkpoint(tmp_path / "last", encoder, {"step": 3})
    assert load_training_checkpoint(tmp_path / "last", Encoder(tiny_encoder_config))["step"] == 3

    weights = tmp_path / "last" / ENCODER_DIR / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 2000):  # inside the tensors: the file still parses
        data[offset] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the checksum"):
        load_training_checkpoint(tmp_path / "last", Encoder(tiny_encoder_config))
