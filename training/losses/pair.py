"""Multi-scale baselines: a per-level pair loss, summed over levels.

The DyML paper (Sun et al., CVPR 2021, section 5.1) compares Cross-Scale Learning against "multi-scale"
versions of standard losses: the loss of each label level computed with that level's labels, the
results summed. Where pytorch-metric-learning (PML) implements the published definition we use it
rather than a rewrite; this module only adds the per-level bookkeeping and documents the
conventions PML uses, because they differ between losses:

* ``multiscale_triplet``: PML ``TripletMarginLoss`` on **plain (not squared) Euclidean distances**
  between L2-normalised embeddings, averaged over the triplets with a positive loss. ``sampling="all"``
  takes every valid triplet of the batch; ``sampling="distance_weighted"`` draws one negative per
  anchor-positive pair with PML's ``DistanceWeightedMiner`` (Wu et al. 2017: negatives drawn with
  weight ``1/q(d)``, the inverse density of distances between random points of the sphere, distances
  clamped at ``cutoff``, negatives beyond ``nonzero_loss_cutoff`` never drawn), the sampling the DM²
  paper trains its cohort with; mined per level, on that level's labels.
* ``multiscale_contrastive``: contrastive loss on plain Euclidean distances; positives cost
  ``[D - pos_margin]_+``, negatives ``[neg_margin - D]_+``; each part averaged over its pairs with a
  positive loss (PML ``ContrastiveLoss``'s convention).
* ``multiscale_multisimilarity``: multi-similarity on cosine similarity (Wang et al. 2019, ``alpha``,
  ``beta``, ``base`` as in the paper and PML's ``MultiSimilarityLoss``), averaged over anchors.
* ``multiscale_npair``: PML ``NPairsLoss``: one positive pair per class of the batch, softmax over the
  inner products with the other classes' positives (Sohn 2016, without the L2 penalty on norms,
  which is moot for normalised embeddings).
* ``multiscale_circle``: Circle loss (Sun et al. 2020) in its **class-level form** (one learnable proxy
  per class and level, as the DyML paper groups it with the classification losses): PML's
  ``CircleLoss`` evaluated between the batch and the level's proxies (``ref_emb``), so each sample has
  one positive (its class proxy) and every other proxy as a negative. ``m`` is the relaxation and
  ``gamma`` the scale, on cosine similarity; averaged over samples.

Contrastive and multi-similarity are written out in ``training.losses.soft``, in Metrix's generic
soft-label form, so that mixup can score mixed embeddings with them (``mixed_loss``); with hard labels
they equal PML's losses (the tests check it to 1e-5).

Every loss accepts labels of shape ``(N,)`` (finest level only) or ``(N, L)``, an explicit ``levels``
selection, returns a scalar and records no per-call statistics (PML's ``collect_stats`` is off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from training.losses.classification import init_proxies
from training.losses.common import check_label_range, check_levels, full_precision, labels_for_levels
from training.losses.registry import LOSSES
from training.losses.soft import SoftContrastiveLoss, SoftMultiSimilarityLoss

__all__ = [
    "MultiScaleLoss",
    "multiscale_circle",
    "multiscale_contrastive",
    "multiscale_multisimilarity",
    "multiscale_npair",
    "multiscale_triplet",
]


class MultiScaleLoss(nn.Module):
    """Sum over the selected label levels of one PML loss each, optionally against per-level proxies.

    Args:
        num_classes: classes per label level, finest first.
        embedding_dim: dimension of the embeddings.
        make_loss: builds the PML loss of one level (called once per selected level).
        levels: label columns to train on (0 = finest); default all.
        with_proxies: give each level a learnable proxy matrix and compare the batch against it
            (``ref_emb``) instead of against itself: the class-level form of a pair loss.
        make_miner: builds the PML miner of one level; the level's loss then takes the tuples it mines
            on that level's labels instead of every pair or triplet of the batch. Default none.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        embedding_dim: int,
        make_loss: Callable[[], nn.Module],
        levels: Sequence[int] | None = None,
        *,
        with_proxies: bool = False,
        make_miner: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = [int(c) for c in num_classes]
        self.levels = check_levels(levels, len(self.num_classes))
        self.level_losses = nn.ModuleList(make_loss() for _ in self.levels)
        self.level_miners = nn.ModuleList(make_miner() for _ in self.levels) if make_miner is not None else None
        self.proxies = (
            nn.ParameterList(init_proxies(self.num_classes[k], embedding_dim) for k in self.levels)
            if with_proxies
            else None
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over levels of each level's loss on ``(embeddings, labels[:, level])``.

        Args:
            embeddings: ``(N, D)`` embeddings (the PML distances normalise them).
            labels: ``(N,)`` finest-level ids or ``(N, L)`` ids per level.
        """
        labels = labels_for_levels(labels, embeddings, self.levels)
        embeddings = full_precision(embeddings)
        total = embeddings.new_zeros(())
        for head, level in enumerate(self.levels):
            target = labels[:, level]
            if self.proxies is None:
                mined = self.level_miners[head](embeddings, target) if self.level_miners is not None else None
                total = total + self.level_losses[head](embeddings, target, mined)
                continue
            check_label_range(target, level, self.num_classes[level])
            proxies = F.normalize(full_precision(self.proxies[head]), dim=-1)
            classes = torch.arange(len(proxies), device=embeddings.device)
            total = total + self.level_losses[head](embeddings, target, ref_emb=proxies, ref_labels=classes)
        return total

    def extra_repr(self) -> str:
        mined = self.level_miners is not None
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, proxies={self.proxies is not None}, mined={mined}"
        )


_TRIPLET_SAMPLING = ("all", "distance_weighted")


@LOSSES.register("multiscale_triplet")
def multiscale_triplet(
    num_classes: Sequence[int],
    embedding_dim: int,
    margin: float = 0.1,
    levels: Sequence[int] | None = None,
    sampling: str = "all",
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> MultiScaleLoss:
    """Triplet margin loss per level (plain Euclidean distance on unit vectors, margin in distance units).

    ``sampling="all"`` uses every valid triplet; ``"distance_weighted"`` mines one negative per anchor-positive
    pair with PML's ``DistanceWeightedMiner(cutoff, nonzero_loss_cutoff)``. The two cutoffs are distances
    between unit vectors and matter only for that sampling; 0.5 and 1.4 are Wu et al.'s values.
    """
    if sampling not in _TRIPLET_SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(map(repr, _TRIPLET_SAMPLING))}, got {sampling!r}")
    if not 0 < cutoff < 2:
        raise ValueError(f"cutoff must lie in (0, 2) (a distance between unit vectors), got {cutoff}")
    if not cutoff < nonzero_loss_cutoff <= 2:
        raise ValueError(f"nonzero_loss_cutoff must lie in (cutoff, 2] = ({cutoff}, 2], got {nonzero_loss_cutoff}")
    make_miner: Callable[[], nn.Module] | None = None
    if sampling == "distance_weighted":
        make_miner = partial(
            pml_miners.DistanceWeightedMiner,
            cutoff=cutoff,
            nonzero_loss_cutoff=nonzero_loss_cutoff,
            collect_stats=False,
        )
    return MultiScaleLoss(
        num_classes,
        embedding_dim,
        lambda: pml_losses.TripletMarginLoss(margin=margin, collect_stats=False),
        levels,
        make_miner=make_miner,
    )


@LOSSES.register("multiscale_contrastive")
def multiscale_contrastive(
    num_classes: Sequence[int],
    embedding_dim: int,
    pos_margin: float = 0.0,
    neg_margin: float = 0.7,
    levels: Sequence[int] | None = None,
) -> SoftContrastiveLoss:
    """Contrastive loss per level (plain Euclidean distance; negatives pushed beyond ``neg_margin``); Metrix-ready."""
    return SoftContrastiveLoss(num_classes, pos_margin=pos_margin, neg_margin=neg_margin, levels=levels)


@LOSSES.register("multiscale_multisimilarity")
def multiscale_multisimilarity(
    num_classes: Sequence[int],
    embedding_dim: int,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    levels: Sequence[int] | None = None,
) -> SoftMultiSimilarityLoss:
    """Multi-similarity loss per level (cosine; the paper's alpha = 2, beta = 50, base = 0.5); Metrix-ready."""
    return SoftMultiSimilarityLoss(num_classes, alpha=alpha, beta=beta, base=base, levels=levels)


@LOSSES.register("multiscale_npair")
def multiscale_npair(
    num_classes: Sequence[int], embedding_dim: int, levels: Sequence[int] | None = None
) -> MultiScaleLoss:
    """N-pair loss per level (inner products; one positive pair per class in the batch)."""
    return MultiScaleLoss(num_classes, embedding_dim, lambda: pml_losses.NPairsLoss(collect_stats=False), levels)


@LOSSES.register("multiscale_circle")
def multiscale_circle(
    num_classes: Sequence[int],
    embedding_dim: int,
    m: float = 0.25,
    gamma: float = 64.0,
    levels: Sequence[int] | None = None,
) -> MultiScaleLoss:
    """Class-level Circle loss per level against learnable proxies (relaxation ``m``, scale ``gamma``)."""
    return MultiScaleLoss(
        num_classes,
        embedding_dim,
        lambda: pml_losses.CircleLoss(m=m, gamma=gamma, collect_stats=False),
        levels,
        with_proxies=True,
    )
