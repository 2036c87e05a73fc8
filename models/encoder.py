"""The encoder: backbone -> attention -> pooling -> embedding head -> L2-normalised vector.

Everything needed to rebuild an encoder (architecture and preprocessing) lives in its
``EncoderConfig``, which travels inside every checkpoint, so indexing and serving never
need a second copy of the input size or normalisation.

One config can also describe an *ensemble* (``backbone: ensemble``): ``members`` lists the configs of
encoders whose L2-normalised embeddings are concatenated and re-normalised (``models.ensemble``, the output
of DM² mutual learning). ``create_encoder`` builds either kind, so every loader gets ensembles for free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
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

__all__ = ["ENSEMBLE_BACKBONE", "Encoder", "EncoderConfig", "create_encoder", "eval_mode"]

#: The ``backbone`` of an ensemble config: its architecture is its ``members``.
ENSEMBLE_BACKBONE = "ensemble"


class EncoderConfig(StrictModel):
    """Architecture and preprocessing of an encoder; stored in its checkpoint.

    ``projection`` places the projection to ``embedding_dim``: ``after_pooling`` (a linear layer on the
    pooled vector, the default) or ``before_pooling`` (a 1x1 convolution on the feature map, then pooling,
    the AML student's layout). ``teacher_id`` is set on a distilled student: the id of the encoder whose
    space it embeds into.

    ``members`` is empty for an ordinary encoder. A non-empty list makes an ensemble config: ``backbone`` is
    ``"ensemble"``, ``embedding_dim`` the sum of the members' dims, ``preprocess`` and ``levels`` those of
    every member (one image tensor feeds them all), and no member is itself an ensemble. The ensemble's own
    ``pretrained``, ``attention``, ``pooling`` and ``projection`` fields are unused. Configs written before
    the field existed have no ``members`` key and read as ordinary encoders.
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
    members: list[EncoderConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_ensemble(self) -> EncoderConfig:
        """An ensemble's shape follows from its members; a mismatch is an error naming the member at fault."""
        if not self.members:
            if self.backbone == ENSEMBLE_BACKBONE:
                raise ValueError(f"backbone {ENSEMBLE_BACKBONE!r} needs members (the encoders it concatenates)")
            return self
        if self.backbone != ENSEMBLE_BACKBONE:
            raise ValueError(
                f"an encoder with members is an ensemble: its backbone must be {ENSEMBLE_BACKBONE!r}, "
                f"not {self.backbone!r}"
            )
        for i, member in enumerate(self.members):
            name = f"members[{i}] ({member.backbone})"
            if member.members:
                raise ValueError(f"{name} is itself an ensemble; list its members in the outer ensemble instead")
            if member.preprocess != self.preprocess:
                raise ValueError(
                    f"{name} preprocesses images as {_describe(member.preprocess)}, the ensemble as "
                    f"{_describe(self.preprocess)}: every member of an ensemble must take the same input"
                )
            if member.levels != self.levels:
                raise ValueError(f"{name} has levels {member.levels}, the ensemble {self.levels}")
        total = sum(member.embedding_dim for member in self.members)
        if self.embedding_dim != total:
            dims = " + ".join(str(member.embedding_dim) for member in self.members)
            raise ValueError(
                f"embedding_dim {self.embedding_dim} of an ensemble must be the sum of its members' dims "
                f"({dims} = {total})"
            )
        return self


def _describe(pre: PreprocessConfig) -> str:
    return f"input_size={pre.input_size} mean={tuple(pre.mean)} std={tuple(pre.std)} resize={pre.resize}"


def create_encoder(config: EncoderConfig, backbone_weights: str | Path | None = None) -> Encoder:
    """Build the encoder ``config`` describes: an ``EnsembleEncoder`` when it has members, else an ``Encoder``.

    The one constructor that loaders (checkpoints, indexing, serving, evaluation, export) call, so an ensemble
    checkpoint works wherever a single encoder does.
    """
    if config.members:
        from models.ensemble import EnsembleEncoder  # the subclass lives beside, and imports, this module

        return EnsembleEncoder(config, backbone_weights=backbone_weights)
    return Encoder(config, backbone_weights=backbone_weights)


class Encoder(nn.Module):
    """Maps a batch of normalised images ``(N, 3, H, W)`` to L2-normalised float32 embeddings ``(N, D)``.

    Args:
        config: architecture and preprocessing.
        backbone_weights: optional local file with pretrained backbone weights.

    Raises:
        BackboneError: ``model.backbone`` / ``model.pretrained`` at fault (the message starts with the key),
            or an unusable weights file.
        UnknownNameError: an unknown ``model.attention`` or ``model.pooling`` (the message starts with the key).
        ConfigError: ``model.attention_params`` / ``model.pooling_params`` the module does not accept, or an
            ensemble config (build those with ``create_encoder``).
    """

    def __init__(self, config: EncoderConfig, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if config.members:
            raise ConfigError(
                f"model.backbone {ENSEMBLE_BACKBONE!r}: an ensemble config is built by models.create_encoder "
                "(or models.ensemble.EnsembleEncoder), not Encoder"
            )
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

    def embed_feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """Pooling + head: the L2-normalised embeddings ``(N, D)`` of a ``feature_map`` output ``(N, C, h, w)``.

        The second half of ``forward``, so feature-level methods (Metrix feature mixup) can mix maps and embed
        the mixture exactly as an image's own map would be. With ``projection: before_pooling`` the 1x1
        projection runs on the map before pooling, as in ``forward``.
        """
        if isinstance(self.head, ConvProjectionHead):
            return self.head.normalise(self.pooling(self.head(features)).float())
        return self.head(self.pooling(features).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_feature_map(self.feature_map(images))


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
    """Run a block with ``module`` in eval mode, then give every submodule back its previous train/eval mode.

    Embedding for evaluation, indexing or export happens in the middle of training too; the caller's mode
    (and so BatchNorm's running statistics) must survive it, exceptions included. Each submodule's own mode is
    restored, not the top module's: an ensemble wraps live cohort members that may be training while the
    ensemble object itself was last set to eval, and a frozen teacher inside an objective stays in eval.
    """
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for sub, was_training in modes:
            sub.training = was_training
