"""Checkpoints cannot be silently corrupt: ``model.safetensors`` is checked against ``config.json`` on every load.

Changed bytes inside the weights still load with safetensors (only the header is parsed), so without the check
a damaged checkpoint returns wrong embeddings under the right encoder id. These tests damage real files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from file_damage import flip_bytes, truncate

from models import CheckpointError, load_encoder, read_checkpoint_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def copy(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "encoder"))


def _drop_checksum(checkpoint: Path) -> None:
    """Make ``checkpoint`` look like one written before ``weights_sha256`` existed."""
    config = checkpoint / "config.json"
    payload = json.loads(config.read_text())
    del payload["weights_sha256"]
    config.write_text(json.dumps(payload, indent=2))


def test_config_records_the_weights_sha256_and_the_id_is_its_prefix(tiny_checkpoint):
    payload = json.loads((tiny_checkpoint / "config.json").read_text())
    digest = hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert payload["weights_sha256"] == digest
    assert payload["encoder_id"] == digest[:16]  # ids are unchanged by the new key
    info = read_checkpoint_info(tiny_checkpoint)
    assert (info.encoder_id, info.weights_sha256) == (digest[:16], digest)
    assert load_encoder(tiny_checkpoint).encoder_id == digest[:16]


@pytest.mark.parametrize("damage", ["flip2000", "truncate"])
def test_damaged_weights_fail_in_one_line_naming_the_file(copy, damage):
    weights = copy / "model.safetensors"
    flip_bytes(weights, 2000, seed=1) if damage == "flip2000" else truncate(weights)
    with pytest.raises(CheckpointError) as caught:
        load_encoder(copy)
    message = str(caught.value)
    assert "\n" not in message and str(weights) in message
    assert "does not match the checksum recorded in config.json" in message


def test_a_single_flipped_byte_is_caught(copy):
    flip_bytes(copy / "model.safetensors", 1, seed=3)
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_encoder(copy)


def test_old_checkpoints_without_the_key_still_load(copy, tiny_checkpoint):
    _drop_checksum(copy)
    assert read_checkpoint_info(copy).weights_sha256 is None
    assert load_encoder(copy).encoder_id == read_checkpoint_info(tiny_checkpoint).encoder_id


def test_old_checkpoints_are_checked_against_their_encoder_id(copy):
    _drop_checksum(copy)
    flip_bytes(copy / "model.safetensors", 2000, seed=2)
    with pytest.raises(CheckpointError, match=r"does not match the encoder id [0-9a-f]{16} recorded in config\.json"):
        load_encoder(copy)


def test_a_checksum_that_contradicts_the_id_is_refused(copy):
    config = copy / "config.json"
    payload = json.loads(config.read_text())
    payload["weights_sha256"] = "0" * 64
    config.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="corrupt or was edited"):
        read_checkpoint_info(copy)
    payload["weights_sha256"] = "not a hash"
    config.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="64 lowercase hex digits"):
        read_checkpoint_info(copy)
