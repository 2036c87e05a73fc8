"""Encoders: timm backbones, attention, pooling, embedding heads and self-describing checkpoints."""

from models.checkpoint import CheckpointError, CheckpointInfo, load_encoder, read_checkpoint_info, save_encoder
from models.encoder import Encoder, EncoderConfig

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Encoder",
    "EncoderConfig",
    "load_encoder",
    "read_checkpoint_info",
    "save_encoder",
]
