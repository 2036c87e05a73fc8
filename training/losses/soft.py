"""Metric losses defined for soft labels: the generic form Metrix mixes with (Venkataramanan et al., ICLR 2022).

Metrix writes a metric loss for an anchor ``a`` as

    sigma+(sum_x y rho+(s(a, x))) + sigma-(sum_x (1 - y) rho-(s(a, x)))

where ``y`` in [0, 1] is how much ``x`` is a positive of ``a``. With hard labels (``y`` in {0, 1}) each loss here is
the standard loss, checked against pytorch-metric-learning (PML) to 1e-5; with the labels of mixed embeddings
(``lam`` parts of one item, ``1 - lam`` of another, :class:`MixedLabels`) the same formula scores the mixture.
That is why the mixing code (``training.mixup``) only builds embeddings and :class:`MixedLabels`: every loss
knows how to weigh them.

Two families share the bookkeeping:

* pair losses (:class:`SoftPairLoss`): every clean anchor against every other embedding; a clean batch excludes
  the self pairs, a mixed batch compares every anchor with every mixed embedding (no pair is excluded: a mixture
  built from the anchor itself is a legitimate, partly positive, comparison).
* proxy losses (:class:`SoftProxyLoss`): every embedding against one learnable proxy per class and level; the
  soft label is a distribution over the classes, so clean and mixed batches take the same path.

Both normalise what they receive (mixed embeddings are re-normalised by the caller, but nothing here relies on
it), compute in full precision, and sum the per-level losses over the selected ``levels`` like the rest of
``training.losses``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.classification import init_proxies
from training.losses.common import (
    as_label_matrix,
    check_label_range,
    check_levels,
    full_precision,
    labels_for_levels,
)
from training.losses.registry import LOSSES

__all__ = [
    "MixedLabels",
    "ProxyAnchorLoss",
    "ProxyNCAPlusPlusLoss",
    "SoftContrastiveLoss",
    "SoftLabelLoss",
    "SoftMultiSimilarityLoss",
    "SoftPairLoss",
    "SoftProxyLoss",
    "multiscale_proxy_anchor",
    "multiscale_proxy_nca_pp",
]


@dataclass(frozen=True, eq=False)  # tensors: no field-wise ==
class MixedLabels:
    """Labels of M mixed embeddings: ``mixed[m]`` is ``lam[m]`` parts of an item with labels ``first[m]`` and
    ``(1 - lam[m])`` parts of an item with labels ``second[m]`` (per label level).

    Hard labels are the special case ``first == second, lam == 1``, so clean and mixed batches use one type.

    Attributes:
        first: ``(M, L)`` int64 class ids of the first mixed item, one column per label level.
        second: ``(M, L)`` int64 class ids of the second mixed item.
        lam: ``(M,)`` floating mixing weights in [0, 1] of the first item.
    """

    first: torch.Tensor
    second: torch.Tensor
    lam: torch.Tensor

    def __post_init__(self) -> None:
        first = as_label_matrix(self.first, self.first.shape[0] if self.first.ndim else 0)
        second = as_label_matrix(self.second, first.shape[0])
        if first.shape != second.shape:
            raise ValueError(f"first and second labels differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
        if self.lam.ndim != 1 or self.lam.shape[0] != first.shape[0]:
            raise ValueError(f"lam must have shape ({first.shape[0]},), got {tuple(self.lam.shape)}")
        if self.lam.device != first.device or second.device != first.device:
            raise ValueError(
                f"first, second and lam must be on one device, got {first.device}, {second.device}, {self.lam.device}"
            )
        if not self.lam.dtype.is_floating_point:
            raise ValueError(f"lam must be floating point, got dtype {self.lam.dtype}")
        if self.lam.numel() and not bool(((self.lam >= 0) & (self.lam <= 1)).all()):
            raise ValueError("lam must lie in [0, 1] (the share of the first item in each mixture)")
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "second", second)

    @classmethod
    def hard(cls, labels: torch.Tensor) -> MixedLabels:
        """Plain labels as mixtures of an item with itself: ``labels`` ``(M,)`` (one level) or ``(M, L)``."""
        matrix = as_label_matrix(labels, labels.shape[0] if labels.ndim else 0)
        return cls(matrix, matrix, torch.ones(matrix.shape[0], device=matrix.device))

    def __len__(self) -> int:
        return self.first.shape[0]

    @property
    def num_levels(self) -> int:
        return self.first.shape[1]

    def pair_targets(self, anchor_classes: torch.Tensor, level: int) -> torch.Tensor:
        """``(A, M)`` soft positive-ness ``y[a, m] = lam*[c_a == first[m, level]] + (1-lam)*[c_a == second[m, level]]``.

        Args:
            anchor_classes: ``(A,)`` class ids of the anchors at ``level``.
            level: the label column compared.
        """
        self._check_level(level)
        if anchor_classes.ndim != 1:
            raise ValueError(f"anchor_classes must have shape (A,), got {tuple(anchor_classes.shape)}")
        anchors = anchor_classes.to(self.first.device)[:, None]
        lam = self.lam[None, :]
        same_first = (anchors == self.first[None, :, level]).to(lam.dtype)
        same_second = (anchors == self.second[None, :, level]).to(lam.dtype)
        return lam * same_first + (1 - lam) * same_second

    def class_targets(self, num_classes: int, level: int) -> torch.Tensor:
        """``(M, C)`` soft class distribution at ``level`` (``pair_targets`` with the C class ids as anchors).

        Raises:
            ValueError: a class id at ``level`` outside ``[0, num_classes)``.
        """
        self._check_level(level)
        check_label_range(self.first[:, level], level, num_classes)
        check_label_range(self.second[:, level], level, num_classes)
        lam = self.lam[:, None]
        first = F.one_hot(self.first[:, level], num_classes).to(lam.dtype)
        second = F.one_hot(self.second[:, level], num_classes).to(lam.dtype)
        return lam * first + (1 - lam) * second

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"label level {level} asked of mixed labels with {self.num_levels} column(s)")


def log1p_weighted_sum_exp(logits: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(1 + sum_dim weights * exp(logits))``, stable for large logits; zero weights drop their term.

    The soft form of PML's masked ``logsumexp(..., add_one=True)``: a weight of exactly 0 removes the term (so
    hard 0/1 weights reproduce the mask), and its gradient is 0, never ``0 * inf``.
    """
    kept = weights > 0
    safe_log = torch.log(torch.where(kept, weights, torch.ones_like(weights)))
    terms = torch.where(kept, logits + safe_log, torch.full_like(logits, float("-inf")))
    one = terms.new_zeros([1 if d == dim % terms.ndim else s for d, s in enumerate(terms.shape)])
    return torch.logsumexp(torch.cat([one, terms], dim=dim), dim=dim)


class SoftLabelLoss(nn.Module, ABC):
    """A metric loss in Metrix's generic form ``sigma+(sum_x y rho+(s(a,x))) + sigma-(sum_x (1-y) rho-(s(a,x)))``,
    defined for soft labels ``y`` in [0, 1]; with hard labels it IS the standard loss.

    Args:
        num_classes: classes per label level, finest first.
        levels: label columns to train on (0 = finest); default all. The loss is summed over them.
    """

    def __init__(self, num_classes: Sequence[int], levels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_classes = [int(c) for c in num_classes]
        self.levels = check_levels(levels, len(self.num_classes))

    @abstractmethod
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The standard loss of a clean batch: ``embeddings`` ``(N, D)``, ``labels`` ``(N,)`` or ``(N, L)``."""

    @abstractmethod
    def mixed_loss(
        self,
        anchors: torch.Tensor | None,
        anchor_labels: torch.Tensor | None,
        mixed: torch.Tensor,
        mixed_labels: MixedLabels,
    ) -> torch.Tensor:
        """Loss of the mixed embeddings ``(M, D)`` against the clean anchors ``(N, D)`` with labels ``(N,)`` or
        ``(N, L)`` (pair losses: every anchor vs every mixed embedding, soft positive-ness from ``mixed_labels``),
        or against the proxies (proxy losses: anchors unused). Summed over the loss's selected levels, like forward.
        """

    def _check_mixed(self, mixed: torch.Tensor, mixed_labels: MixedLabels) -> None:
        if mixed.ndim != 2:
            raise ValueError(f"mixed embeddings must have shape (M, D), got {tuple(mixed.shape)}")
        if len(mixed_labels) != mixed.shape[0]:
            raise ValueError(f"mixed labels have {len(mixed_labels)} rows but there are {mixed.shape[0]} embeddings")
        if mixed_labels.num_levels <= max(self.levels):
            raise ValueError(
                f"the loss uses label level {max(self.levels)} but the mixed labels have only "
                f"{mixed_labels.num_levels} column(s)"
            )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, levels={self.levels}"


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(full_precision(embeddings), dim=-1)


class SoftPairLoss(SoftLabelLoss):
    """A pair loss: every anchor against every reference embedding, weighted by soft positive-ness.

    Subclasses give the relation between unit vectors (:meth:`relation`: similarity or distance) and the loss of
    one level from it and the positive / negative weights of every pair (:meth:`level_loss`).
    """

    @abstractmethod
    def relation(self, anchors: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """``(A, M)`` similarity or distance between unit anchors ``(A, D)`` and unit references ``(M, D)``."""

    @abstractmethod
    def level_loss(self, relation: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """One level's loss from the ``(A, M)`` relation and the pairs' weights as positive and as negative."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The standard loss: every pair of the batch but the self pairs, positives by equal class id per level."""
        labels = labels_for_levels(labels, embeddings, self.levels)
        unit = _unit(embeddings)
        relation = self.relation(unit, unit)
        not_self = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
        total = unit.new_zeros(())
        for level in self.levels:
            same = labels[:, level, None] == labels[None, :, level]
            positive = (same & not_self).to(unit.dtype)
            total = total + self.level_loss(relation, positive, (~same).to(unit.dtype))
        return total

    def mixed_loss(
        self,
        anchors: torch.Tensor | None,
        anchor_labels: torch.Tensor | None,
        mixed: torch.Tensor,
        mixed_labels: MixedLabels,
    ) -> torch.Tensor:
        if anchors is None or anchor_labels is None:
            raise ValueError("a pair loss scores mixed embeddings against clean anchors; pass anchors and their labels")
        anchor_labels = labels_for_levels(anchor_labels, anchors, self.levels)
        self._check_mixed(mixed, mixed_labels)
        unit_anchors, unit_mixed = _unit(anchors), _unit(mixed)
        if unit_mixed.dtype != unit_anchors.dtype:
            unit_mixed = unit_mixed.to(unit_anchors.dtype)
        relation = self.relation(unit_anchors, unit_mixed)
        total = relation.new_zeros(())
        for level in self.levels:
            y = mixed_labels.pair_targets(anchor_labels[:, level], level).to(relation)
            total = total + self.level_loss(relation, y, 1 - y)
        return total


def _mean_of_positive(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the terms divided by how many are > 0 (PML's AvgNonZeroReducer); 0 when none is."""
    count = (terms > 0).sum()
    return terms.sum() / count.clamp_min(1).to(terms.dtype)


class SoftContrastiveLoss(SoftPairLoss):
    """Contrastive loss (Hadsell et al. 2006) on plain Euclidean distances between unit vectors, PML's convention.

    With ``d`` the distance, a pair of positive-ness ``y`` costs ``y [d - pos_margin]_+`` as a positive and
    ``(1 - y) [neg_margin - d]_+`` as a negative. Each sub-loss is the sum of its weighted terms divided by the
    number of terms that are > 0 (PML's ``AvgNonZeroReducer``: pairs already beyond their margin do not dilute
    the average); the two are added. In Metrix's table: sigma+ = sigma- = identity, rho+ = distance,
    rho- = hinge, per level summed.

    Args:
        num_classes: classes per label level, finest first.
        pos_margin: positives closer than this cost nothing (distance units, in [0, 2) for unit vectors).
        neg_margin: negatives further than this cost nothing.
        levels: label columns to train on; default all.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        pos_margin: float = 0.0,
        neg_margin: float = 0.7,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_classes, levels)
        if pos_margin < 0:
            raise ValueError(f"pos_margin must be >= 0 (a distance), got {pos_margin}")
        if neg_margin <= pos_margin:
            raise ValueError(f"neg_margin must exceed pos_margin ({pos_margin}), got {neg_margin}")
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def relation(self, anchors: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return torch.cdist(anchors, references)

    def level_loss(self, relation: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        pos = positive * F.relu(relation - self.pos_margin)
        neg = negative * F.relu(self.neg_margin - relation)
        return _mean_of_positive(pos) + _mean_of_positive(neg)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


class SoftMultiSimilarityLoss(SoftPairLoss):
    """Multi-similarity loss (Wang et al. 2019) on cosine similarity, PML's convention, for soft labels.

    Per anchor::

        (1/alpha) log(1 + sum_x y e^{-alpha (s - base)}) + (1/beta) log(1 + sum_x (1 - y) e^{beta (s - base)})

    averaged over the anchors (those without positives or negatives included, their term being log 1 = 0). PML
    calls the positive scale ``alpha`` and the negative one ``beta`` (the paper's alpha = 2, beta = 50, lambda =
    ``base`` = 0.5); no pair mining, as in PML's loss.

    Args:
        num_classes: classes per label level, finest first.
        alpha: scale of the positive terms.
        beta: scale of the negative terms.
        base: the similarity the terms are centred on.
        levels: label columns to train on; default all.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_classes, levels)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

    def relation(self, anchors: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return anchors @ references.T

    def level_loss(self, relation: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        pos = log1p_weighted_sum_exp(-self.alpha * (relation - self.base), positive, dim=1) / self.alpha
        neg = log1p_weighted_sum_exp(self.beta * (relation - self.base), negative, dim=1) / self.beta
        return (pos + neg).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, base={self.base}"


class SoftProxyLoss(SoftLabelLoss):
    """A proxy loss: every embedding against one learnable proxy per class, per selected level.

    The soft label of an embedding is a distribution over the level's classes (:meth:`MixedLabels.class_targets`),
    so a clean batch is the mixed batch of its hard labels and both take one path; ``anchors`` are unused.

    Args:
        num_classes: classes per label level, finest first.
        embedding_dim: dimension of the embeddings (and proxies).
        levels: label columns to train on; levels left out get no proxies.
    """

    def __init__(self, num_classes: Sequence[int], embedding_dim: int, levels: Sequence[int] | None = None) -> None:
        super().__init__(num_classes, levels)
        self.proxies = nn.ParameterList(init_proxies(self.num_classes[k], embedding_dim) for k in self.levels)

    @abstractmethod
    def level_loss(self, unit: torch.Tensor, proxies: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One level's loss of unit embeddings ``(M, D)`` with soft class targets ``(M, C)`` against unit proxies."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The standard loss: each embedding's class at each level is its one positive proxy."""
        labels = labels_for_levels(labels, embeddings, self.levels)
        return self.mixed_loss(None, None, embeddings, MixedLabels.hard(labels))

    def mixed_loss(
        self,
        anchors: torch.Tensor | None,
        anchor_labels: torch.Tensor | None,
        mixed: torch.Tensor,
        mixed_labels: MixedLabels,
    ) -> torch.Tensor:
        self._check_mixed(mixed, mixed_labels)
        unit = _unit(mixed)
        total = unit.new_zeros(())
        for head, level in enumerate(self.levels):
            targets = mixed_labels.class_targets(self.num_classes[level], level).to(unit)
            proxies = _unit(self.proxies[head]).to(unit.dtype)
            total = total + self.level_loss(unit, proxies, targets)
        return total


class ProxyAnchorLoss(SoftProxyLoss):
    """Proxy Anchor loss (Kim et al., CVPR 2020) on cosine similarity, PML's ``ProxyAnchorLoss`` convention.

    With ``s`` the cosine between embedding ``x`` and proxy ``p`` and ``y`` the soft target of ``x`` for ``p``'s class::

        (1/|P+|) sum_{p in P+} log(1 + sum_x y e^{-alpha (s - margin)})
            + (1/C) sum_p log(1 + sum_x (1 - y) e^{alpha (s + margin)})

    where ``P+`` is the set of proxies with some positive weight in the batch (``sum_x y > 0``) and the negative
    term runs over all ``C`` proxies. Metrix's table: multi-similarity's form with the proxies as anchors.

    Args:
        num_classes: classes per label level, finest first.
        embedding_dim: dimension of the embeddings.
        margin: the cosine margin ``delta``.
        alpha: the scale of the exponents.
        levels: label columns to train on; default all.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        embedding_dim: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        levels: Sequence[int] | None = None,
    ) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"margin must lie in [0, 1) (a cosine), got {margin}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        super().__init__(num_classes, embedding_dim, levels)
        self.margin = float(margin)
        self.alpha = float(alpha)

    def level_loss(self, unit: torch.Tensor, proxies: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cosine = unit @ proxies.T
        pos = log1p_weighted_sum_exp(-self.alpha * (cosine - self.margin), targets, dim=0)
        neg = log1p_weighted_sum_exp(self.alpha * (cosine + self.margin), 1 - targets, dim=0)
        with_positives = (targets.sum(dim=0) > 0).sum().clamp_min(1).to(pos.dtype)
        return pos.sum() / with_positives + neg.sum() / len(proxies)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}"


class ProxyNCAPlusPlusLoss(SoftProxyLoss):
    """ProxyNCA++ (Teh et al., ECCV 2020): a softmax over all proxies of ``-d^2(x, p) / T``, for soft targets.

    Per embedding ``-log(sum_p y_p exp(-d^2(x, p)/T) / sum_p exp(-d^2(x, p)/T))`` with ``d`` the Euclidean distance
    of unit vectors, averaged over the embeddings; hard labels give PML's ``ProxyNCALoss`` with
    ``softmax_scale = 1/T``. Metrix's table writes the negative part as ``sigma-(sum_x (1 - y) rho-)``, a
    denominator without the positive proxy (plain ProxyNCA); we keep ++'s denominator over all proxies so that
    hard labels give the standard ProxyNCA++ (and a soft target's ``y`` splits one softmax, a proper
    cross-entropy against the mixed class distribution). Only the loss is here: ++'s other changes (fast proxy
    learning rate, global max pooling, low-temperature scaling at training only) belong to the recipe.

    Args:
        num_classes: classes per label level, finest first.
        embedding_dim: dimension of the embeddings.
        temperature: the softmax temperature ``T`` (the paper's 1/9).
        levels: label columns to train on; default all.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        embedding_dim: int,
        temperature: float = 0.11,
        levels: Sequence[int] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(num_classes, embedding_dim, levels)
        self.temperature = float(temperature)

    def level_loss(self, unit: torch.Tensor, proxies: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        squared = (2 - 2 * (unit @ proxies.T)).clamp_min(0)  # |x - p|^2 of unit vectors
        log_prob = torch.log_softmax(-squared / self.temperature, dim=1)
        kept = targets > 0
        safe_log = torch.log(torch.where(kept, targets, torch.ones_like(targets)))
        terms = torch.where(kept, log_prob + safe_log, torch.full_like(log_prob, float("-inf")))
        return -torch.logsumexp(terms, dim=1).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


@LOSSES.register("multiscale_proxy_anchor")
def multiscale_proxy_anchor(
    num_classes: Sequence[int],
    embedding_dim: int,
    margin: float = 0.1,
    alpha: float = 32.0,
    levels: Sequence[int] | None = None,
) -> ProxyAnchorLoss:
    """Proxy Anchor per level, summed (the paper's ``margin = 0.1, alpha = 32``); supports Metrix's soft labels."""
    return ProxyAnchorLoss(num_classes, embedding_dim, margin=margin, alpha=alpha, levels=levels)


@LOSSES.register("multiscale_proxy_nca_pp")
def multiscale_proxy_nca_pp(
    num_classes: Sequence[int],
    embedding_dim: int,
    temperature: float = 0.11,
    levels: Sequence[int] | None = None,
) -> ProxyNCAPlusPlusLoss:
    """ProxyNCA++ per level, summed (temperature ``T = 0.11``, the paper's 1/9); supports Metrix's soft labels."""
    return ProxyNCAPlusPlusLoss(num_classes, embedding_dim, temperature=temperature, levels=levels)
