"""Where a run's encoder starts: random, ImageNet weights (hub or ``--weights``), or an engine checkpoint.

``--init-from DIR`` (``TrainConfig.init_from``) starts from an encoder this engine trained: every layer
(backbone, attention, pooling, head), so a model trained on one collection continues on another, or a run
continues under a new recipe. Its architecture comes with it: the run's ``model`` section is replaced by the
checkpoint's (a recipe's backbone or dimension cannot describe weights that have another shape), and a
warning names the recipe keys that differed. Only ``levels`` (the data's) and ``provenance`` (the new run's)
are the run's own. The weights are read through ``models.checkpoint.load_weights_into``, which verifies them
against the SHA-256 recorded in the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from models.checkpoint import CheckpointError, CheckpointInfo, load_weights_into, read_checkpoint_info
from models.encoder import Encoder, EncoderConfig, create_encoder
from training.config import TrainConfig

__all__ = ["ARCHITECTURE_FIELDS", "adopt_checkpoint_architecture", "build_encoder", "init_provenance"]

logger = logging.getLogger(__name__)

#: The ``model`` keys an ``--init-from`` checkpoint decides.
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "backbone",
    "attention",
    "attention_params",
    "pooling",
    "pooling_params",
    "embedding_dim",
    "projection",
    "preprocess",
)


def adopt_checkpoint_architecture(config: TrainConfig) -> tuple[TrainConfig, CheckpointInfo | None]:
    """``config`` with the ``init_from`` checkpoint's architecture as its ``model`` (unchanged without one).

    Returns:
        The config and the checkpoint's info (``None`` without ``init_from``).

    Raises:
        CheckpointError: ``init_from`` is not a readable encoder checkpoint.
    """
    if config.init_from is None:
        return config, None
    info = read_checkpoint_info(config.init_from)
    if info.config.members:
        raise CheckpointError(
            f"--init-from {config.init_from} is an ensemble of {len(info.config.members)} encoders; start from one "
            "of its members (saved beside it in members/) or train a cohort with a mutual section"
        )
    source, current = info.config, config.model
    differing = [name for name in ARCHITECTURE_FIELDS if getattr(current, name) != getattr(source, name)]
    if differing:
        changes = "; ".join(
            f"model.{name} {_short(getattr(current, name))} -> {_short(getattr(source, name))}" for name in differing
        )
        logger.warning("--init-from %s: the architecture is the checkpoint's (%s)", config.init_from, changes)
    model = source.model_copy(
        update={
            "pretrained": False,
            "levels": current.levels,
            "provenance": dict(current.provenance),
            "teacher_id": None,
        }
    )
    return config.model_copy(update={"model": model}), info


def build_encoder(config: TrainConfig, model: EncoderConfig | None = None) -> Encoder:
    """The run's encoder: ``model`` (default ``config.model``) with its starting weights.

    The weights come from ``config.backbone_weights`` (a backbone state dict), the hub or cache
    (``model.pretrained``), or every layer from ``config.init_from``; otherwise they are random.
    """
    encoder = create_encoder(model or config.model, backbone_weights=config.backbone_weights)
    if config.init_from is not None:
        load_weights_into(encoder, config.init_from)
    return encoder


def init_provenance(info: CheckpointInfo) -> dict[str, Any]:
    """What the new encoder's provenance records about the checkpoint it started from."""
    return {
        "path": str(info.path),
        "encoder_id": info.encoder_id,
        "recipe": info.config.provenance.get("recipe"),
        "steps": info.config.provenance.get("steps"),
    }


def _short(value: Any) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
