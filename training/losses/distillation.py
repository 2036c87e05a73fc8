"""Distillation losses of Asymmetric Metric Learning (Budnik & Avrithis, CVPR 2021) and their baselines.

In asymmetric retrieval a large frozen teacher ``g`` embeds the gallery once, offline, and a small student
``f`` embeds the queries on the device; the two must share one space, ``s_asym(q, x) = s(f(q), g(x))``.
The student is therefore trained against the teacher's vectors rather than against labels. Every loss here
takes, besides the student's ``embeddings`` ``(B, D)`` (unit vectors, with gradient):

* ``ref_emb`` ``(M, D)``, ``M >= B``: teacher vectors (unit vectors). **Contract: row ``i < B`` is the
  teacher embedding of anchor ``i`` itself, ``g(q_i)``**; rows ``B..`` are teacher vectors of mined
  positives and negatives. The teacher is frozen: ``ref_emb`` is detached, it never receives a gradient.
* ``indices_tuple`` ``(a1, p, a2, n)``, pytorch-metric-learning's pair form: ``(a1[j], p[j])`` are
  positive pairs, ``(a2[j], n[j])`` negative pairs; ``a*`` index ``embeddings``, ``p`` / ``n`` index
  ``ref_emb``. Only the losses with ``needs_tuples = True`` use (and require) it.
* ``labels``: accepted for the uniform loss signature and ignored (the tuples already encode them).

``s`` is the cosine (dot product of unit vectors) and ``D = sqrt(max(2 - 2s, 0))`` the Euclidean distance
of unit vectors, clamped inside the square root so that its gradient stays finite. On the unit sphere this
equals ``||f - g||``; the two gradients differ only along ``f`` itself, which the encoder's final
L2 normalisation projects away.

Registered losses (names in ``LOSSES``):

* ``aml_contrastive`` (Contr): cirtorch's contrastive loss on the asymmetric tuple
  ``[f(q), g(p), g(n_1..n_5)]``: ``0.5 D^2`` per positive pair, ``0.5 max(0, margin - D)^2`` per negative
  pair. cirtorch sums over the tuple; here the sum over **all pairs of the batch is divided by the number
  of anchors ``B``**, i.e. the mean over anchors of each anchor's tuple sum (its scale does not grow with
  the batch size).
* ``aml_contrastive_plus`` (Contr+): the same plus the query's own teacher vector as an extra positive,
  ``0.5 D(f(q_i), g(q_i))^2`` per anchor (``include_self=True``).
* ``aml_regression`` (Reg): ``mean_i (1 - s(f(q_i), g(q_i)))``, equal to ``0.5 ||f - g||^2`` for unit
  vectors; no labels, no mining.
* ``aml_triplet``: ``max(0, s(a, n) - s(a, p) + margin)`` for every (positive, negative) combination of
  an anchor, averaged over all such triplets.
* ``aml_multisimilarity``: multi-similarity (Wang et al. 2019) on the asymmetric pairs, averaged over the
  anchors that have at least one pair. pytorch-metric-learning's ``MultiSimilarityLoss`` averages over all
  ``B`` anchors (an anchor without pairs counts as 0) and counts a pair listed twice once; the two agree
  whenever every anchor has a pair and no pair repeats, which is what the AML miner produces.
* ``rkd``: Relational Knowledge Distillation (Park et al., CVPR 2019), a symmetric baseline comparing the
  batch's pairwise distances (normalised by their mean) and triplet angles of student and teacher
  ``ref_emb[:B]``.
* ``darkrank``: DarkRank (Chen et al., AAAI 2018), hard-rank listwise transfer: the Plackett-Luce
  likelihood, under the student's scores, of the teacher's ranking of the other batch samples.

The talk accompanying the paper reports that the asymmetric triplet and multi-similarity losses *fail* in
asymmetric testing (the student learns a space of its own instead of the teacher's); they are here as
baselines, expected to lose to Contr / Contr+ / Reg, not as bugs to fix. No loss keeps per-call state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.common import full_precision
from training.losses.registry import LOSSES

__all__ = [
    "AsymmetricContrastiveLoss",
    "AsymmetricMultiSimilarityLoss",
    "AsymmetricRegressionLoss",
    "AsymmetricTripletLoss",
    "DarkRankLoss",
    "DistillationLoss",
    "PairIndices",
    "RKDLoss",
    "aml_contrastive",
    "aml_contrastive_plus",
    "aml_multisimilarity",
    "aml_regression",
    "aml_triplet",
    "darkrank",
    "rkd",
]

#: ``(a1, p, a2, n)``: positive pairs ``(a1[j], p[j])`` and negative pairs ``(a2[j], n[j])``.
PairIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Floor of a squared distance before its square root: keeps d sqrt / dx finite for coincident vectors.
_EPS = 1e-12


class DistillationLoss(nn.Module):
    """Base of the distillation losses: checks the teacher vectors and the pair tuple, then computes.

    Subclasses implement :meth:`compute` on validated inputs and set ``needs_tuples``.
    """

    is_distillation: ClassVar[bool] = True
    needs_tuples: ClassVar[bool] = False

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        ref_emb: torch.Tensor | None = None,
        indices_tuple: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Loss of the student ``embeddings`` against the frozen teacher vectors ``ref_emb``.

        Args:
            embeddings: ``(B, D)`` student embeddings of the ``B`` queries (L2-normalised).
            labels: ignored; part of the uniform ``(embeddings, labels)`` loss signature.
            ref_emb: ``(M, D)`` teacher vectors, ``M >= B``, row ``i < B`` the teacher vector of anchor ``i``.
            indices_tuple: ``(a1, p, a2, n)`` pairs (anchors index ``embeddings``, the others ``ref_emb``);
                required when ``needs_tuples`` is true, ignored otherwise.

        Raises:
            ValueError: ``ref_emb`` is missing or does not fit ``embeddings``, or a required tuple is missing
                or malformed.
        """
        name = type(self).__name__
        student, teacher = _check_embeddings(name, embeddings, ref_emb)
        pairs = _check_pairs(name, indices_tuple) if self.needs_tuples else None
        return self.compute(student, teacher, pairs)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        """The loss on validated inputs: ``teacher`` detached, same dtype; ``pairs`` set iff ``needs_tuples``."""
        raise NotImplementedError


class AsymmetricContrastiveLoss(DistillationLoss):
    """cirtorch's contrastive loss between student anchors and teacher positives / negatives (Contr, Contr+).

    Args:
        margin: negatives closer than this Euclidean distance are pushed out (0.7 in AML; 0.85 for ResNet101).
        include_self: add the anchor's own teacher vector ``ref_emb[i]`` as a positive (Contr+).
    """

    needs_tuples: ClassVar[bool] = True

    def __init__(self, margin: float = 0.7, include_self: bool = False) -> None:
        super().__init__()
        self.margin = float(margin)
        self.include_self = bool(include_self)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        assert pairs is not None  # forward requires the tuple for this loss
        a1, p, a2, n = pairs
        pos = 0.5 * _squared_distance(_pair_similarity(student, teacher, a1, p)).sum()
        neg_dist = _distance(_pair_similarity(student, teacher, a2, n))
        neg = 0.5 * F.relu(self.margin - neg_dist).pow(2).sum()
        total = pos + neg
        if self.include_self:
            own = (student * teacher[: len(student)]).sum(dim=1)
            total = total + 0.5 * _squared_distance(own).sum()
        return total / len(student)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, include_self={self.include_self}"


class AsymmetricRegressionLoss(DistillationLoss):
    """Reg: pull each student embedding onto its own teacher vector, ``mean_i (1 - s(f_i, g_i))``."""

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        return (1.0 - (student * teacher[: len(student)]).sum(dim=1)).mean()


class AsymmetricTripletLoss(DistillationLoss):
    """Triplet loss on asymmetric similarities: every (positive, negative) combination of each anchor.

    Args:
        margin: required similarity gap ``s(a, p) - s(a, n)``.
    """

    needs_tuples: ClassVar[bool] = True

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = float(margin)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        assert pairs is not None  # forward requires the tuple for this loss
        a1, p, a2, n = pairs
        pos = _pair_similarity(student, teacher, a1, p)
        neg = _pair_similarity(student, teacher, a2, n)
        same_anchor = a1[:, None] == a2[None, :]  # (P, N): the triplets
        if not bool(same_anchor.any()):
            return _zero(student)
        return F.relu(neg[None, :] - pos[:, None] + self.margin)[same_anchor].mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class AsymmetricMultiSimilarityLoss(DistillationLoss):
    """Multi-similarity loss (Wang et al. 2019) on asymmetric pairs, averaged over anchors that have pairs.

    Per anchor: ``(1/alpha) log(1 + sum_pos exp(-alpha (s - base))) + (1/beta) log(1 + sum_neg exp(beta (s -
    base)))``; a pair listed twice counts twice.

    Args:
        alpha: weight of the positive similarities.
        beta: weight of the negative similarities.
        base: similarity at which a pair's weight changes side.
    """

    needs_tuples: ClassVar[bool] = True

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        assert pairs is not None  # forward requires the tuple for this loss
        a1, p, a2, n = pairs
        sim = student @ teacher.T
        pos_count = _pair_counts(sim, a1, p)
        neg_count = _pair_counts(sim, a2, n)
        pos = _log_one_plus_sum_exp(-self.alpha * (sim - self.base), pos_count) / self.alpha
        neg = _log_one_plus_sum_exp(self.beta * (sim - self.base), neg_count) / self.beta
        has_pairs = (pos_count.sum(dim=1) + neg_count.sum(dim=1)) > 0
        if not bool(has_pairs.any()):
            return _zero(student)
        return (pos + neg)[has_pairs].mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}"


class RKDLoss(DistillationLoss):
    """Relational Knowledge Distillation (Park et al. 2019): the batch's distance and angle structure.

    With ``t = ref_emb[:B]`` (no gradient): the distance term is the smooth-L1 between student and teacher
    distances ``||e_i - e_j||`` over the ``B(B-1)`` pairs ``i != j``, each side divided by the mean of its
    own off-diagonal distances (the reference code averages over all ``B^2`` entries, diagonal zeros
    included, i.e. a factor ``(B-1)/B`` smaller). The angle term is the smooth-L1 between the cosines of the
    angle at ``j``, ``<normalize(e_i - e_j), normalize(e_k - e_j)>``, averaged over all ``B^3`` entries as
    in the reference code (degenerate ``i = j`` or ``k = j`` entries are 0 on both sides). Memory is
    ``O(B^2 D)``.

    Args:
        distance_weight: weight of the distance term.
        angle_weight: weight of the angle term.
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        _check_batch_of_two(type(self).__name__, student)
        anchors = teacher[: len(student)]
        total = _zero(student)
        if self.distance_weight:
            with torch.no_grad():
                target = _normalised_distances(anchors)
            total = total + self.distance_weight * F.smooth_l1_loss(_normalised_distances(student), target)
        if self.angle_weight:
            with torch.no_grad():
                target = _angles(anchors)
            total = total + self.angle_weight * F.smooth_l1_loss(_angles(student), target)
        return total

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class DarkRankLoss(DistillationLoss):
    """DarkRank (Chen et al. 2018), hard-rank version: make the student rank the batch as the teacher does.

    For each anchor ``i`` the candidates are the other ``B - 1`` samples, scored ``-alpha D(e_i, e_j)^beta``
    on each side. With ``pi`` the teacher's ranking (descending score), the loss is the Plackett-Luce
    negative log-likelihood of ``pi`` under the student's scores,
    ``-sum_r [s_{pi_r} - log sum_{r' >= r} exp(s_{pi_r'})]``, averaged over anchors. The reference code
    (RKD repository, ``HardDarkRank``) truncates the list at the teacher's top 4; here the whole list is used.

    Args:
        alpha: scale of the scores.
        beta: exponent of the distance in the scores.
    """

    def __init__(self, alpha: float = 3.0, beta: float = 3.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)

    def compute(self, student: torch.Tensor, teacher: torch.Tensor, pairs: PairIndices | None) -> torch.Tensor:
        _check_batch_of_two(type(self).__name__, student)
        batch = len(student)
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=student.device)
        with torch.no_grad():
            teacher_scores = -self.alpha * _pairwise_distances(teacher[:batch]).pow(self.beta)
            teacher_scores = teacher_scores.masked_fill(~off_diagonal, float("-inf"))  # self ranks last
            ranking = teacher_scores.argsort(dim=1, descending=True, stable=True)[:, : batch - 1]
        scores = (-self.alpha * _pairwise_distances(student).pow(self.beta)).gather(1, ranking)
        suffix_lse = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)  # log sum_{r' >= r} exp(s_{pi_r'})
        return -(scores - suffix_lse).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def _check_embeddings(
    name: str, embeddings: torch.Tensor, ref_emb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if embeddings.ndim != 2:
        raise ValueError(f"{name}: embeddings must have shape (B, D), got {tuple(embeddings.shape)}")
    if ref_emb is None:
        raise ValueError(
            f"{name} is a distillation loss: pass the teacher's vectors as ref_emb (M >= B rows, "
            "row i < B the teacher embedding of anchor i)"
        )
    if ref_emb.ndim != 2 or ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{name}: ref_emb must have shape (M, {embeddings.shape[1]}) to match the embeddings, "
            f"got {tuple(ref_emb.shape)}"
        )
    if ref_emb.shape[0] < embeddings.shape[0]:
        raise ValueError(
            f"{name}: ref_emb has {ref_emb.shape[0]} rows but there are {embeddings.shape[0]} anchors; its first "
            "B rows must be the teacher embeddings of the anchors themselves"
        )
    student = full_precision(embeddings)
    return student, ref_emb.detach().to(dtype=student.dtype)


def _check_pairs(name: str, indices_tuple: Sequence[torch.Tensor] | None) -> PairIndices:
    if indices_tuple is None:
        raise ValueError(f"{name} needs mined pairs: pass indices_tuple=(a1, p, a2, n)")
    if len(indices_tuple) != 4:
        raise ValueError(f"{name}: indices_tuple must be pairs (a1, p, a2, n), got {len(indices_tuple)} tensors")
    for index in indices_tuple:
        if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype.is_floating_point:
            raise ValueError(f"{name}: indices_tuple must hold four 1-D integer tensors")
    a1, p, a2, n = (index.long() for index in indices_tuple)
    if len(a1) != len(p) or len(a2) != len(n):
        raise ValueError(
            f"{name}: indices_tuple pairs have unequal lengths: a1 {len(a1)} vs p {len(p)}, a2 {len(a2)} vs n {len(n)}"
        )
    return a1, p, a2, n


def _check_batch_of_two(name: str, student: torch.Tensor) -> None:
    if len(student) < 2:
        raise ValueError(f"{name} compares the samples of a batch with each other; it needs B >= 2, got {len(student)}")


def _zero(student: torch.Tensor) -> torch.Tensor:
    # A zero that stays in the graph, so that backward() works on a batch without pairs or triplets.
    return (student * 0.0).sum()


def _pair_similarity(
    student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor, refs: torch.Tensor
) -> torch.Tensor:
    return (student[anchors] * teacher[refs]).sum(dim=1)


def _squared_distance(similarity: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * similarity).clamp(min=0.0)


def _distance(similarity: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * similarity).clamp(min=_EPS).sqrt()


def _pair_counts(sim: torch.Tensor, anchors: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros_like(sim)
    return counts.index_put_((anchors, refs), torch.ones_like(anchors, dtype=sim.dtype), accumulate=True)


def _log_one_plus_sum_exp(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log(1 + sum_j counts_ij exp(x_ij))``, stable; rows without counts give 0."""
    weighted = x + counts.log()  # log 0 = -inf drops the entry (and its gradient)
    return torch.logsumexp(torch.cat([weighted, x.new_zeros(len(x), 1)], dim=1), dim=1)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    squared = x.pow(2).sum(dim=1)
    return (squared[:, None] + squared[None, :] - 2.0 * x @ x.T).clamp(min=_EPS).sqrt()


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    distances = _pairwise_distances(x)[off_diagonal]
    return distances / distances.mean()


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``(B^3,)`` cosines of the angle at ``j``, entry ``[j, i, k]``; 0 where ``i = j`` or ``k = j``."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # [j, i] = normalize(x_i - x_j)
    return torch.bmm(directions, directions.transpose(1, 2)).reshape(-1)


@LOSSES.register("aml_contrastive")
def aml_contrastive(
    num_classes: Sequence[int], embedding_dim: int, margin: float = 0.7, include_self: bool = False
) -> AsymmetricContrastiveLoss:
    """Contr: contrastive loss on ``[f(q), g(p), g(n_1..n_k)]``; ``include_self`` makes it Contr+."""
    return AsymmetricContrastiveLoss(margin=margin, include_self=include_self)


@LOSSES.register("aml_contrastive_plus")
def aml_contrastive_plus(
    num_classes: Sequence[int], embedding_dim: int, margin: float = 0.7
) -> AsymmetricContrastiveLoss:
    """Contr+: Contr with the query's own teacher vector ``g(q)`` as an extra positive."""
    return AsymmetricContrastiveLoss(margin=margin, include_self=True)


@LOSSES.register("aml_regression")
def aml_regression(num_classes: Sequence[int], embedding_dim: int) -> AsymmetricRegressionLoss:
    """Reg: ``mean(1 - s(f(q), g(q)))``; no labels, no mining."""
    return AsymmetricRegressionLoss()


@LOSSES.register("aml_triplet")
def aml_triplet(num_classes: Sequence[int], embedding_dim: int, margin: float = 0.1) -> AsymmetricTripletLoss:
    """Asymmetric triplet baseline (expected to fail in asymmetric testing)."""
    return AsymmetricTripletLoss(margin=margin)


@LOSSES.register("aml_multisimilarity")
def aml_multisimilarity(
    num_classes: Sequence[int], embedding_dim: int, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5
) -> AsymmetricMultiSimilarityLoss:
    """Asymmetric multi-similarity baseline (expected to fail in asymmetric testing)."""
    return AsymmetricMultiSimilarityLoss(alpha=alpha, beta=beta, base=base)


@LOSSES.register("rkd")
def rkd(
    num_classes: Sequence[int], embedding_dim: int, distance_weight: float = 1.0, angle_weight: float = 2.0
) -> RKDLoss:
    """Relational Knowledge Distillation, a symmetric-distillation baseline (weights 1 and 2 as in the paper)."""
    return RKDLoss(distance_weight=distance_weight, angle_weight=angle_weight)


@LOSSES.register("darkrank")
def darkrank(num_classes: Sequence[int], embedding_dim: int, alpha: float = 3.0, beta: float = 3.0) -> DarkRankLoss:
    """DarkRank (hard-rank), a symmetric-distillation baseline (alpha = beta = 3)."""
    return DarkRankLoss(alpha=alpha, beta=beta)
