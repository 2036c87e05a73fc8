"""The ensemble encoder: several encoders' L2-normalised embeddings, concatenated and L2-normalised again.

Deep mutual learning (DM²) trains a cohort of L encoders together and ships, beside each member, the cohort
as one encoder. Each member's embedding has unit norm, so the concatenation has norm sqrt(L) and the
re-normalisation divides by it: the inner product of two ensemble embeddings is the mean of the members'
cosines, every member weighing the same whatever its dimension.

The ensemble is an ordinary encoder to everything downstream: its config lists the members' configs
(``EncoderConfig.members``, backbone ``"ensemble"``), its weights are the members' under ``members.<i>.``,
and ``models.create_encoder`` builds it from the config, so ``load_encoder``, indexing, ONNX export and
serving accept its checkpoint unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from models.encoder import ENSEMBLE_BACKBONE, Encoder, EncoderConfig
from retrieval.config import ConfigError, format_validation_error
from retrieval.errors import UserFacingError

__all__ = ["EnsembleEncoder", "NoFeatureMapError", "ensemble_config", "join_embeddings"]


class NoFeatureMapError(UserFacingError, NotImplementedError):
    """A feature-level method (feature mixup, a map hook) asked an ensemble for the one map it does not have."""


def ensemble_config(member_configs: Sequence[EncoderConfig], provenance: dict[str, Any] | None = None) -> EncoderConfig:
    """The config of the ensemble of encoders with ``member_configs``: their sum of dims, their preprocessing.

    Args:
        member_configs: the members' configs, in the order their embeddings are concatenated (copied).
        provenance: what the ensemble records about its making (the members keep their own).

    Raises:
        ConfigError: no members, a member that is an ensemble, or members whose preprocessing (input size,
            mean/std, resize) or levels differ; the message names the member.
    """
    configs = list(member_configs)
    if not configs:
        raise ConfigError("an ensemble needs at least one member")
    first = configs[0]
    try:
        return EncoderConfig(
            backbone=ENSEMBLE_BACKBONE,
            embedding_dim=sum(config.embedding_dim for config in configs),
            preprocess=first.preprocess.model_copy(),
            levels=list(first.levels),
            members=[config.model_copy(deep=True) for config in configs],
            provenance=dict(provenance or {}),
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "cannot make an ensemble:")) from None


class EnsembleEncoder(Encoder):
    """Maps images ``(N, 3, H, W)`` to ``normalize(cat([member(images) for member in members]))``, ``(N, sum D_i)``.

    Build it from an ensemble config (``EnsembleEncoder(config)``, what ``create_encoder`` and so
    ``load_encoder`` do), or around live encoders with :meth:`from_members`. Members may have different
    backbones and dimensions; they share the input (``preprocess``), which the config validates.

    Args:
        config: an ensemble config (non-empty ``members``).
        backbone_weights: a local backbone state dict loaded into every member; only for members that share one
            backbone architecture.

    Raises:
        ConfigError: ``config`` has no members, or ``backbone_weights`` with members of different backbones.
        BackboneError, UnknownNameError: a member's architecture cannot be built (as for ``Encoder``).
    """

    members: nn.ModuleList

    def __init__(self, config: EncoderConfig, backbone_weights: str | Path | None = None) -> None:
        if not config.members:
            raise ConfigError(
                f"an EnsembleEncoder needs a config with members (backbone {ENSEMBLE_BACKBONE!r}); "
                f"got backbone {config.backbone!r} without members"
            )
        backbones = sorted({member.backbone for member in config.members})
        if backbone_weights is not None and len(backbones) > 1:
            raise ConfigError(
                f"backbone_weights {backbone_weights} fit one backbone; this ensemble's members have "
                f"{', '.join(backbones)}: load each member's weights into it before assembling the ensemble"
            )
        self._attach(config, [Encoder(member, backbone_weights=backbone_weights) for member in config.members])

    @classmethod
    def from_members(cls, encoders: Sequence[Encoder], provenance: dict[str, Any] | None = None) -> EnsembleEncoder:
        """Wrap live encoders (shared, not copied) as one ensemble.

        The ensemble holds the very modules given: training them changes its output, and saving it saves their
        current weights. Its config is ``ensemble_config`` of their configs as they are now; after replacing a
        member's config (say, its provenance at the end of training), call :meth:`refresh_config`.

        Raises:
            ConfigError: no encoders, one that is already an ensemble, the same module twice, or members whose
                preprocessing or levels differ.
            TypeError: something that is not an ``models.Encoder``.
        """
        encoders = list(encoders)
        for i, encoder in enumerate(encoders):
            if not isinstance(encoder, Encoder):
                raise TypeError(f"member {i} is a {type(encoder).__name__}, not a models.Encoder")
            if isinstance(encoder, EnsembleEncoder):
                raise ConfigError(f"member {i} is itself an ensemble; pass its members instead")
            for j in range(i):
                if encoders[j] is encoder:
                    raise ConfigError(f"members {j} and {i} are the same encoder; an ensemble needs distinct ones")
        config = ensemble_config([encoder.config for encoder in encoders], provenance)
        ensemble = cls.__new__(cls)
        ensemble._attach(config, encoders)
        ensemble.training = any(encoder.training for encoder in encoders)
        return ensemble

    def refresh_config(self) -> EncoderConfig:
        """Rebuild ``config`` from the members' current configs, keeping the ensemble's provenance; return it."""
        self.config = ensemble_config([member.config for member in self.members], self.config.provenance)
        return self.config

    def _attach(self, config: EncoderConfig, members: Sequence[Encoder]) -> None:
        """Become the ensemble of ``members``: an ``nn.Module`` without the single encoder's backbone or head."""
        nn.Module.__init__(self)
        self.config = config
        self.members = nn.ModuleList(members)
        self.encoder_id: str | None = None

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        raise NoFeatureMapError(
            "an ensemble encoder has no single feature map (its members' maps differ in channels and size); "
            "apply feature-level methods to each member (ensemble.members[i]) instead"
        )

    def embed_feature_map(self, features: torch.Tensor) -> torch.Tensor:
        raise NoFeatureMapError(
            "an ensemble encoder cannot embed a feature map: each member pools and projects its own; "
            "use ensemble.members[i].embed_feature_map"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parts = [member(images) for member in self.members]
        return F.normalize(torch.cat(parts, dim=1), p=2.0, dim=1, eps=1e-12)


def join_embeddings(parts: Sequence[np.ndarray]) -> np.ndarray:
    """What :class:`EnsembleEncoder` computes, from the members' embeddings of the same images already at hand:
    ``(N, D_i)`` arrays concatenated and L2-normalised again, float32 ``(N, sum D_i)``.

    Scoring a cohort embeds each model once and joins the vectors, instead of running every model a second time
    inside the ensemble.
    """
    joined = np.concatenate([np.asarray(part, dtype=np.float32) for part in parts], axis=1)
    return joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
