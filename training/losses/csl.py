"""Cross-Scale Learning (CSL), the loss of Dynamic Metric Learning (Sun et al., CVPR 2021, section 5.2).

A multi-scale baseline asks every level for its own compactness: two images of different fine classes
but the same coarse class are pushed apart by the fine loss and pulled together by the coarse one. CSL
removes that conflict with one reference. With ``s_p`` the similarity of ``x`` to its own *fine* class
and ``s_n^{k,j}`` its similarity to a class ``j`` that differs from it at level ``k``, it asks for
``s_n^{k,j} + m_k < s_p`` at every level, with margins growing with the scale (like the markings of a
ruler, all measured from the same zero):

    L = sum_k log(1 + sum_j exp(gamma * (s_n^{k,j} - s_p + m_k)))        (averaged over the batch)

Classification form (``csl``, the paper's main method): one learnable proxy per **fine** class; a
coarser class is the set of its fine proxies (proxy sharing), represented by its hardest (most
similar) proxy, so ``s_n^{k,j} = max_{f in j} cos(x, w_f)`` and ``s_p = cos(x, w_{y_fine})``.
``negatives="all"`` is the variant of the public reimplementation that takes the log-sum-exp over all
fine proxies whose level-``k`` class differs, instead of one max per class.

Pair form (``csl_pair``): the same inequality with batch samples in place of proxies. METHODS leaves
the details open; our choices: every other sample of the anchor's fine class is a reference ``s_p``
(the loss is averaged over the anchor's positive pairs, then over anchors that have one); a negative
class at level ``k`` is represented by its hardest sample in the batch (or all its samples with
``negatives="all"``). ``csl_joint`` is the sum of both forms ("Cls+Pair", paper Table 4).

Defaults are those of the public reimplementation: ``gamma = 32``, margins ``(0.25, 0.35, 0.45)`` for
(fine, middle, coarse); with another number of levels the margins default to ``0.25 + 0.1 k``.
Similarities are cosines of L2-normalised vectors. No per-call state is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.losses.classification import init_proxies
from training.losses.common import as_label_matrix, check_label_range, check_levels, full_precision, labels_for_levels
from training.losses.registry import LOSSES

__all__ = ["CrossScaleClassificationLoss", "CrossScalePairLoss", "csl", "csl_joint", "csl_pair", "default_margins"]

Negatives = Literal["hardest", "all"]


def default_margins(num_levels: int) -> list[float]:
    """Margins that grow with the scale: (0.25, 0.35, 0.45) for three levels, ``0.25 + 0.1 k`` in general."""
    return [round(0.25 + 0.1 * k, 10) for k in range(num_levels)]


def _check_margins(margins: Sequence[float] | None, num_levels: int) -> list[float]:
    if margins is None:
        return default_margins(num_levels)
    values = [float(m) for m in margins]
    if len(values) != num_levels:
        raise ValueError(f"margins needs one value per label level ({num_levels}), got {values}")
    return values


def _check_common(gamma: float, negatives: str) -> None:
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if negatives not in ("hardest", "all"):
        raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")


def _log1p_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum exp(logits))`` over the last axis, stable, and 0 (zero gradient) when all are -inf."""
    zeros = logits.new_zeros((*logits.shape[:-1], 1))
    return torch.logsumexp(torch.cat([zeros, logits], dim=-1), dim=-1)


def _hardest_per_class(
    similarity: torch.Tensor, classes: torch.Tensor, is_negative: torch.Tensor, count: int
) -> torch.Tensor:
    """``(R, count)``: per row, the largest similarity among the negative columns of each class (-inf if none).

    Args:
        similarity: ``(R, M)`` similarities to M candidates (proxies or samples).
        classes: ``(M,)`` or ``(R, M)`` class id in ``[0, count)`` of every candidate.
        is_negative: ``(R, M)`` which candidates are negatives of the row.
        count: number of classes.
    """
    masked = similarity.masked_fill(~is_negative, float("-inf"))
    index = classes.expand_as(masked)
    start = masked.new_full((masked.shape[0], count), float("-inf"))
    return start.scatter_reduce(1, index, masked, reduce="amax", include_self=True)


class CrossScaleClassificationLoss(nn.Module):
    """CSL with one proxy per fine class shared by every level (see the module docstring).

    Args:
        num_classes: classes per label level, finest first.
        embedding_dim: dimension of the embeddings.
        hierarchy: ``(C_fine, L)`` id of every fine class at every level
            (:func:`retrieval.data.labels.class_parents`), which tells which proxies make up a coarse class.
        margins: ``m_k`` per label level (length L); default :func:`default_margins`.
        gamma: the scale factor.
        negatives: ``"hardest"`` proxy per negative class (the paper) or ``"all"`` negative proxies.
        levels: label columns whose term is summed (0 = finest); default all. ``s_p`` always comes from
            the fine proxy.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        embedding_dim: int,
        hierarchy: np.ndarray,
        margins: Sequence[float] | None = None,
        gamma: float = 32.0,
        negatives: Negatives = "hardest",
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = [int(c) for c in num_classes]
        self.levels = check_levels(levels, len(self.num_classes))
        self.margins = _check_margins(margins, len(self.num_classes))
        _check_common(gamma, negatives)
        self.gamma = float(gamma)
        self.negatives = negatives
        table = torch.as_tensor(np.asarray(hierarchy), dtype=torch.long)
        if table.shape != (self.num_classes[0], len(self.num_classes)):
            raise ValueError(
                f"hierarchy must have shape ({self.num_classes[0]}, {len(self.num_classes)}), got {tuple(table.shape)}"
            )
        for k, count in enumerate(self.num_classes):
            check_label_range(table[:, k], k, count)
        # A buffer (not a parameter) that moves with .to(device); not saved, as it is rebuilt from the labels.
        self.register_buffer("hierarchy", table, persistent=False)
        self.proxies = init_proxies(self.num_classes[0], embedding_dim)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the CSL loss, summed over the selected levels.

        Args:
            embeddings: ``(N, D)`` embeddings (normalised here).
            labels: ``(N,)`` fine ids (the coarser ids are then read from the hierarchy) or ``(N, L)`` ids
                per level, whose coarser columns must agree with the hierarchy the loss was built with.
        """
        labels = as_label_matrix(labels, embeddings.shape[0]).to(embeddings.device)
        fine = labels[:, 0]
        check_label_range(fine, 0, self.num_classes[0])
        parents = self.hierarchy[fine]
        if labels.shape[1] > 1:  # given coarser ids: the selected levels must be there and agree with the tree
            labels_for_levels(labels, embeddings, self.levels)
        if not torch.equal(parents[:, : labels.shape[1]], labels):
            raise ValueError("labels do not match the class hierarchy this loss was built with (fine -> coarser ids)")
        unit = F.normalize(full_precision(embeddings), dim=-1)
        cosine = unit @ F.normalize(full_precision(self.proxies), dim=-1).T  # (N, C_fine)
        positive = cosine.gather(1, fine[:, None])  # (N, 1): the one reference for every level
        total = unit.new_zeros(())
        for level in self.levels:
            proxy_class = self.hierarchy[:, level]  # (C_fine,)
            is_negative = proxy_class[None, :] != parents[:, level, None]
            if self.negatives == "hardest" and level > 0:
                negative = _hardest_per_class(cosine, proxy_class, is_negative, self.num_classes[level])
            else:  # at the fine level each class has one proxy, so both variants coincide
                negative = cosine.masked_fill(~is_negative, float("-inf"))
            logits = self.gamma * (negative - positive + self.margins[level])
            total = total + _log1p_sum_exp(logits).mean()
        return total

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, margins={self.margins}, "
            f"gamma={self.gamma}, negatives={self.negatives!r}"
        )


class CrossScalePairLoss(nn.Module):
    """CSL on batch pairs: fine positive pairs as the reference, per-level negative classes (module docstring).

    Args:
        num_classes: classes per label level, finest first (only the number of levels is used).
        margins: ``m_k`` per label level; default :func:`default_margins`.
        gamma: the scale factor.
        negatives: ``"hardest"`` sample per negative class or ``"all"`` negative samples.
        levels: label columns whose term is summed; default all.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        margins: Sequence[float] | None = None,
        gamma: float = 32.0,
        negatives: Negatives = "hardest",
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_levels = len(num_classes)
        self.levels = check_levels(levels, self.num_levels)
        self.margins = _check_margins(margins, self.num_levels)
        _check_common(gamma, negatives)
        self.gamma = float(gamma)
        self.negatives = negatives

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over anchors (those with a fine positive in the batch) of their mean over positive pairs.

        Returns 0 (connected to the graph) when no anchor has a positive.
        """
        labels = labels_for_levels(labels, embeddings, self.levels)
        unit = F.normalize(full_precision(embeddings), dim=-1)
        similarity = unit @ unit.T  # (N, N)
        n = len(unit)
        not_self = ~torch.eye(n, dtype=torch.bool, device=unit.device)
        is_positive = (labels[:, None, 0] == labels[None, :, 0]) & not_self  # (anchor, positive)
        pair_loss = similarity.new_zeros((n, n))
        for level in self.levels:
            column = labels[:, level]
            is_negative = column[:, None] != column[None, :]  # (anchor, candidate)
            if self.negatives == "hardest":
                classes = torch.unique(column, return_inverse=True)[1]
                negative = _hardest_per_class(similarity, classes, is_negative, int(classes.max()) + 1)
            else:
                negative = similarity.masked_fill(~is_negative, float("-inf"))
            # logits[i, p, j] = gamma * (s_n(i, j) - s(i, p) + m): every positive p of i is a reference.
            logits = self.gamma * (negative[:, None, :] - similarity[:, :, None] + self.margins[level])
            pair_loss = pair_loss + _log1p_sum_exp(logits)
        counts = is_positive.sum(dim=1)
        has_positive = counts > 0
        if not has_positive.any():
            return similarity.sum() * 0.0
        per_anchor = (pair_loss * is_positive).sum(dim=1)[has_positive] / counts[has_positive]
        return per_anchor.mean()

    def extra_repr(self) -> str:
        return f"levels={self.levels}, margins={self.margins}, gamma={self.gamma}, negatives={self.negatives!r}"


class _JointLoss(nn.Module):
    """``classification + pair_weight * pair`` (CSL "Cls+Pair")."""

    def __init__(
        self, classification: CrossScaleClassificationLoss, pair: CrossScalePairLoss, pair_weight: float
    ) -> None:
        super().__init__()
        self.classification = classification
        self.pair = pair
        self.pair_weight = float(pair_weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classification(embeddings, labels) + self.pair_weight * self.pair(embeddings, labels)


# The classification form's constructor already has the registry's builder signature.
csl = LOSSES.register("csl")(CrossScaleClassificationLoss)


@LOSSES.register("csl_pair")
def csl_pair(
    num_classes: Sequence[int],
    embedding_dim: int,
    margins: Sequence[float] | None = None,
    gamma: float = 32.0,
    negatives: Negatives = "hardest",
    levels: Sequence[int] | None = None,
) -> CrossScalePairLoss:
    """Cross-Scale Learning, pair form (fine positive pairs as the reference)."""
    del embedding_dim  # no learnable parameters
    return CrossScalePairLoss(num_classes, margins, gamma, negatives, levels)


@LOSSES.register("csl_joint")
def csl_joint(
    num_classes: Sequence[int],
    embedding_dim: int,
    hierarchy: np.ndarray,
    margins: Sequence[float] | None = None,
    gamma: float = 32.0,
    negatives: Negatives = "hardest",
    levels: Sequence[int] | None = None,
    pair_weight: float = 1.0,
) -> nn.Module:
    """Cross-Scale Learning, classification + pair forms summed (the pair term weighted by ``pair_weight``)."""
    return _JointLoss(
        CrossScaleClassificationLoss(num_classes, embedding_dim, hierarchy, margins, gamma, negatives, levels),
        CrossScalePairLoss(num_classes, margins, gamma, negatives, levels),
        pair_weight,
    )
