"""Encoders: timm backbones, attention, pooling, embedding heads, ensembles and self-describing checkpoints."""

from models.checkpoint import CheckpointError, CheckpointInfo, load_encoder, read_checkpoint_info, save_encoder
from models.encoder import Encoder, EncoderConfig, create_encoder
from models.ensemble import EnsembleEncoder, NoFeatureMapError, ensemble_config

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Encoder",
    "EncoderConfig",
    "EnsembleEncoder",
    "NoFeatureMapError",
    "create_encoder",
    "ensemble_config",
    "load_encoder",
    "read_checkpoint_info",
    "save_encoder",
]
