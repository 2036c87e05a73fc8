"""The encoder: backbone -> attention -> pooling -> embedding head -> L2-normalised vector.

Everything needed to rebuild an encoder (architecture and preprocessing) lives in its
``EncoderConfig``, which travels inside every checkpoint, so indexing and serving never
need a second copy of the input size or normalisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from models import attention as _attention  # noqa: F401  (registers the attention modules)
from models import glam as _glam  # noqa: F401  (registers the GLAM attention)
from models import pooling as _pooling  # noqa: F401  (registers the pooling modules)
from models.backbones import BackboneError, create_backbone
from models.heads import ConvProjectionHead, EmbeddingHead
from models.registries import ATTENTION, POOLING
from retrieval.config import ConfigError, StrictModel
from retrieval.data.labels import DEFAULT_LEVELS
from retrieval.data.transforms import PreprocessConfig
from retrieval.registry import UnknownNameError

__all__ = ["Encoder", "EncoderConfig", "eval_mode"]


class EncoderConfig(StrictModel):
    """Architecture and preprocessing of an encoder; stored in its checkpoint.

    ``projection`` places the projection to ``embedding_dim``: ``after_pooling`` (a linear layer on the
    pooled vector, the default) or ``before_pooling`` (a 1x1 convolution on the feature map, then pooling,
    the AML student's layout). ``teacher_id`` is set on a distilled student: the id of the encoder whose
    space it embeds into.
    """

    backbone: str = "resnet18"
    pretrained: bool = False
    attention: str = "identity"
    attention_params: dict[str, Any] = Field(default_factory=dict)
    pooling: str = "gem"
    pooling_params: dict[str, Any] = Field(default_factory=lambda: {"p": 3.0})
    embedding_dim: int = Field(default=128, gt=0)
    projection: Literal["after_pooling", "before_pooling"] = "after_pooling"
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    levels: list[str] = Field(default_factory=lambda: list(DEFAULT_LEVELS))
    provenance: dict[str, Any] = Field(default_factory=dict)
    teacher_id: str | None = None


class Encoder(nn.Module):
    """Maps a batch of normalised images ``(N, 3, H, W)`` to L2-normalised float32 embeddings ``(N, D)``.

    Args:
        config: architecture and preprocessing.
        backbone_weights: optional local file with pretrained backbone weights.

    Raises:
        BackboneError: ``model.backbone`` / ``model.pretrained`` at fault (the message starts with the key),
            or an unusable weights file.
        UnknownNameError: an unknown ``model.attention`` or ``model.pooling`` (the message starts with the key).
        ConfigError: ``model.attention_params`` / ``model.pooling_params`` the module does not accept.
    """

    def __init__(self, config: EncoderConfig, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        try:
            self.backbone = create_backbone(config.backbone, pretrained=config.pretrained, weights=backbone_weights)
        except BackboneError as exc:
            if exc.field is None:
                raise
            raise BackboneError(f"model.{exc.field}: {exc}", field=exc.field) from None
        channels = int(self.backbone.num_features)
        with _config_key("attention"):
            self.attention = ATTENTION.get(config.attention)(channels, **config.attention_params)
        with _config_key("pooling"):
            self.pooling = POOLING.get(config.pooling)(**config.pooling_params)
        self.head: nn.Module
        if config.projection == "before_pooling":
            self.head = ConvProjectionHead(channels, config.embedding_dim)
        else:
            self.head = EmbeddingHead(channels, config.embedding_dim)
        self.encoder_id: str | None = None  # set when loaded from or saved to a checkpoint

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone + attention output ``(N, C, h, w)``; the hook for feature-level methods (mixup, GLAM)."""
        features = self.backbone.forward_features(images)
        if features.ndim != 4:
            raise ValueError(
                f"backbone {self.config.backbone!r} returned a {features.ndim}-d output; "
                "the encoder needs a convolutional (N, C, H, W) feature map"
            )
        return self.attention(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, ConvProjectionHead):
            pooled = self.pooling(self.head(self.feature_map(images)))
            return self.head.normalise(pooled.float())
        pooled = self.pooling(self.feature_map(images))
        return self.head(pooled.float())


@contextlib.contextmanager
def _config_key(module: str) -> Iterator[None]:
    """Name the config key when a module cannot be built: ``model.<module>`` or ``model.<module>_params``.

    A recipe's mistake then reads as one line naming what to change, not as a traceback from the builder.
    """
    try:
        yield
    except UnknownNameError as exc:
        raise UnknownNameError(f"model.{module}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.{module}_params: {exc}") from None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``module`` in eval mode, then give it back its previous train/eval mode.

    Embedding for evaluation, indexing or export happens in the middle of training too; the caller's mode
    (and so BatchNorm's running statistics) must survive it, exceptions included.
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
