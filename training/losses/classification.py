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

from training.losses.registry import LOSSES

__all__ = ["MultiScaleProxySoftmaxLoss", "as_label_matrix", "multiscale_cosface", "multiscale_normsoftmax"]


def as_label_matrix(labels: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Return labels as an int64 ``(N, L)`` tensor; a ``(N,)`` vector becomes one (finest) level.

    Raises:
        ValueError: wrong rank, wrong number of rows, or a non-integer dtype.
    """
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (N,) or (N, L), got {tuple(labels.shape)}")
    if labels.shape[0] != num_embeddings:
        raise ValueError(f"labels have {labels.shape[0]} rows but there are {num_embeddings} embeddings")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    return labels.long()


class MultiScaleProxySoftmaxLoss(nn.Module):
    """Sum over label levels of a cross-entropy on scaled cosine logits, with an optional CosFace margin.

    For level ``k`` with proxies ``W_k`` (one row per class), the logits of sample ``x`` are
    ``s * (cos(x, W_k[j]) - m * [j == y_k])``. ``m = 0`` is the normalised softmax (NormFace);
    ``m > 0`` is CosFace (large-margin cosine loss), which pushes each sample at least ``m`` closer
    (in cosine) to its own proxy than the softmax alone would.

    Args:
        num_classes: classes per label level, finest first (one entry per label column).
        embedding_dim: dimension of the embeddings.
        scale: the fixed logit scale ``s``; with unit vectors the logits would otherwise be confined to
            [-1, 1] and the softmax could never become confident.
        margin: additive cosine margin ``m`` subtracted from the target logit (0 disables it).
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
    ) -> None:
        super().__init__()
        self.num_classes = [int(c) for c in num_classes]
        self.levels = _check_levels(levels, len(self.num_classes))
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if not 0.0 <= margin < 2.0:
            raise ValueError(f"margin must lie in [0, 2) (a cosine difference), got {margin}")
        self.scale = float(scale)
        self.margin = float(margin)
        # Rows of norm ~1 so that Adam's per-coordinate steps move the proxies' directions at a sensible rate.
        std = 1.0 / math.sqrt(embedding_dim)
        self.proxies = nn.ParameterList(
            nn.Parameter(torch.randn(self.num_classes[k], embedding_dim) * std) for k in self.levels
        )

    def level_logits(self, embeddings: torch.Tensor, level: int) -> torch.Tensor:
        """Scaled cosine logits ``(N, C_level)`` without margin (what the head predicts at inference)."""
        head = self.levels.index(level)
        unit = F.normalize(_full_precision(embeddings), dim=-1)
        cosine = unit @ F.normalize(_full_precision(self.proxies[head]), dim=-1).T
        return self.scale * cosine

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-sample loss, summed over the selected levels.

        Args:
            embeddings: ``(N, D)`` embeddings (normalised again here; any norm is accepted).
            labels: ``(N,)`` finest-level ids or ``(N, L)`` ids per level.
        """
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must have shape (N, D), got {tuple(embeddings.shape)}")
        labels = as_label_matrix(labels, embeddings.shape[0]).to(embeddings.device)
        if labels.shape[1] <= max(self.levels):
            raise ValueError(
                f"the loss uses label level {max(self.levels)} but the labels have only {labels.shape[1]} column(s)"
            )
        unit = F.normalize(_full_precision(embeddings), dim=-1)
        total = unit.new_zeros(())
        for head, level in enumerate(self.levels):
            target = labels[:, level]
            classes = self.num_classes[level]
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
                raise ValueError(f"labels at level {level} must lie in [0, {classes}); got values outside")
            cosine = unit @ F.normalize(_full_precision(self.proxies[head]), dim=-1).T
            if self.margin:
                cosine = cosine - self.margin * F.one_hot(target, classes).to(cosine.dtype)
            total = total + F.cross_entropy(self.scale * cosine, target)
        return total

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, levels={self.levels}, scale={self.scale}, margin={self.margin}"


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    # Half-precision logits times s = 30 lose the margin's effect; compute in float32 (float64 stays float64).
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _check_levels(levels: Sequence[int] | None, num_levels: int) -> list[int]:
    if levels is None:
        return list(range(num_levels))
    chosen = list(levels)
    if not chosen:
        raise ValueError("levels is empty; select at least one label level (or leave it unset for all)")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in chosen):
        raise ValueError(f"levels must be label column indices (0 = finest), got {chosen}")
    if len(set(chosen)) != len(chosen) or any(not 0 <= k < num_levels for k in chosen):
        raise ValueError(f"levels must be distinct indices in [0, {num_levels}), got {chosen}")
    return chosen


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
