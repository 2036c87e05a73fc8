"""Proxy-based classification losses, one head per label level (the DyML multi-scale baseline).

Each selected level gets its own matrix of learnable class proxies. Embeddings and proxies are
L2-normalised, so the logits are scaled cosine similarities; this keeps training consistent with
retrieval, which ranks by cosine (inner product of unit vectors). The per-level cross-entropies
are summed, which is the "multi-scale" baseline of Dynamic Metric Learning (Sun et al., CVPR 2021,
section 5.1): a simple way to make one embedding space serve several granularities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.common import check_label_range, check_levels, full_precision, labels_for_levels
from training.losses.registry import LOSSES

__all__ = [
    "MultiScaleProxySoftmaxLoss",
    "init_proxies",
    "multiscale_arcface",
    "multiscale_cosface",
    "multiscale_normsoftmax",
]

# Keeps the angle strictly inside (0, pi): acos has an infinite derivative at +-1.
_ACOS_EPS = 1e-7


def init_proxies(num_classes: int, embedding_dim: int) -> nn.Parameter:
    """A learnable ``(C, D)`` proxy matrix with rows of norm ~1.

    Unit-scale rows let Adam's per-coordinate steps turn the proxies' directions at a sensible rate
    (the loss only sees their directions). Every proxy-based loss of the project starts from here.
    """
    return nn.Parameter(torch.randn(num_classes, embedding_dim) * (1.0 / math.sqrt(embedding_dim)))


class MultiScaleProxySoftmaxLoss(nn.Module):
    """Sum over label levels of a cross-entropy on scaled cosine logits, with an optional target margin.

    For level ``k`` with proxies ``W_k`` (one row per class) and ``cos_j = cos(x, W_k[j])``, the logits
    of sample ``x`` are ``s * cos_j`` for the other classes and, for its own class ``y``:

    * ``margin_type="cosine"``: ``s * (cos_y - m)``. ``m = 0`` is the normalised softmax (NormFace);
      ``m > 0`` is CosFace (large-margin cosine loss), a margin in cosine units.
    * ``margin_type="angular"``: ``s * cos(theta_y + m)`` with ``theta_y = acos(cos_y)``: ArcFace, the
      margin ``m`` in **radians** (pytorch-metric-learning's ``ArcFaceLoss`` takes degrees). No
      "easy margin" or monotonic fix-up is applied when ``theta_y + m > pi``, as in the plain definition.

    One implementation serves the three heads so that they share proxy layout and initialisation
    (checkpoints and resumes do not depend on the variant); the tests check each against
    pytorch-metric-learning's ``NormalizedSoftmaxLoss``, ``CosFaceLoss`` and ``ArcFaceLoss``.

    Args:
        num_classes: classes per label level, finest first (one entry per label column).
        embedding_dim: dimension of the embeddings.
        scale: the fixed logit scale ``s``; with unit vectors the logits would otherwise be confined to
            [-1, 1] and the softmax could never become confident.
        margin: the target margin ``m`` (0 disables it): cosine units or radians, see ``margin_type``.
        margin_type: ``"cosine"`` (CosFace) or ``"angular"`` (ArcFace).
        levels: label columns to train on (indices, finest = 0); default all. Levels left out get no
            proxies and no loss term.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        embedding_dim: int,
        scale: float,
        margin: float = 0.0,
        levels: Sequence[int] | None = None,
        margin_type: str = "cosine",
    ) -> None:
        super().__init__()
        self.num_classes = [int(c) for c in num_classes]
        self.levels = check_levels(levels, len(self.num_classes))
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if margin_type not in ("cosine", "angular"):
            raise ValueError(f"margin_type must be 'cosine' or 'angular', got {margin_type!r}")
        if margin_type == "cosine" and not 0.0 <= margin < 2.0:
            raise ValueError(f"margin must lie in [0, 2) (a cosine difference), got {margin}")
        if margin_type == "angular" and not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must lie in [0, pi/2) radians (ArcFace uses 0.15-0.5), got {margin}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.margin_type = margin_type
        self.proxies = nn.ParameterList(init_proxies(self.num_classes[k], embedding_dim) for k in self.levels)

    def level_logits(self, embeddings: torch.Tensor, level: int) -> torch.Tensor:
        """Scaled cosine logits ``(N, C_level)`` without margin (what the head predicts at inference)."""
        head = self.levels.index(level)
        unit = F.normalize(full_precision(embeddings), dim=-1)
        cosine = unit @ F.normalize(full_precision(self.proxies[head]), dim=-1).T
        return self.scale * cosine

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-sample loss, summed over the selected levels.

        Args:
            embeddings: ``(N, D)`` embeddings (normalised again here; any norm is accepted).
            labels: ``(N,)`` finest-level ids or ``(N, L)`` ids per level.
        """
        labels = labels_for_levels(labels, embeddings, self.levels)
        unit = F.normalize(full_precision(embeddings), dim=-1)
        total = unit.new_zeros(())
        for head, level in enumerate(self.levels):
            target = labels[:, level]
            classes = self.num_classes[level]
            check_label_range(target, level, classes)
            cosine = unit @ F.normalize(full_precision(self.proxies[head]), dim=-1).T
            if self.margin:
                cosine = self._with_margin(cosine, target)
            total = total + F.cross_entropy(self.scale * cosine, target)
        return total

    def _with_margin(self, cosine: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(target), device=cosine.device)
        own = cosine[rows, target]
        if self.margin_type == "cosine":
            shifted = own - self.margin
        else:
            shifted = torch.cos(torch.acos(own.clamp(-1 + _ACOS_EPS, 1 - _ACOS_EPS)) + self.margin)
        return cosine.index_put((rows, target), shifted)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, scale={self.scale}, "
            f"margin={self.margin} ({self.margin_type})"
        )


@LOSSES.register("multiscale_normsoftmax")
def multiscale_normsoftmax(
    num_classes: Sequence[int], embedding_dim: int, scale: float = 16.0, levels: Sequence[int] | None = None
) -> MultiScaleProxySoftmaxLoss:
    """Normalised softmax per level, summed (no margin)."""
    return MultiScaleProxySoftmaxLoss(num_classes, embedding_dim, scale=scale, margin=0.0, levels=levels)


@LOSSES.register("multiscale_cosface")
def multiscale_cosface(
    num_classes: Sequence[int],
    embedding_dim: int,
    scale: float = 30.0,
    margin: float = 0.2,
    levels: Sequence[int] | None = None,
) -> MultiScaleProxySoftmaxLoss:
    """CosFace per level, summed; ``s = 30, m = 0.2`` is gentler than face-recognition defaults (64, 0.35)."""
    return MultiScaleProxySoftmaxLoss(num_classes, embedding_dim, scale=scale, margin=margin, levels=levels)


@LOSSES.register("multiscale_arcface")
def multiscale_arcface(
    num_classes: Sequence[int],
    embedding_dim: int,
    scale: float = 30.0,
    margin: float = 0.15,
    levels: Sequence[int] | None = None,
) -> MultiScaleProxySoftmaxLoss:
    """ArcFace per level, summed; margin in radians. ``s = 30, m = 0.15`` is DOLG's retrieval setting."""
    return MultiScaleProxySoftmaxLoss(
        num_classes, embedding_dim, scale=scale, margin=margin, levels=levels, margin_type="angular"
    )
