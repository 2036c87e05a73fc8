"""Tuple mining for Asymmetric Metric Learning, in the teacher's space (Budnik & Avrithis, CVPR 2021).

For each query the student has just embedded, a pool of *teacher* vectors is ranked by similarity to the
student's query vector; the query's own cluster (its fine class, or its SfM-120k cluster) is skipped, at
most one image per cluster is kept, and the ``k`` most similar remain as hard negatives. The positive is an
official positive of the query where the dataset has them (SfM-120k's ``pidxs``), else another image of
its cluster.

Freshness and cost: the pool (a random sample of the training images, or all of them) is redrawn at every
epoch; the query vectors are the student's own outputs of the current batch (detached), so the negatives
follow the student step by step without an extra pass over the data. Everything drawn is seeded by
``(seed, epoch)`` and ``(seed, step)``, so mining is a pure function of the student's weights and the step,
which keeps resuming bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AsymmetricTupleMiner", "MinedTuples"]


@dataclass(frozen=True)
class MinedTuples:
    """Dataset positions per query: ``positives[i]`` (-1 when the query has none) and ``negatives[i, :]``
    (-1 padding when fewer than ``k`` clusters qualify)."""

    positives: np.ndarray  # (B,) int64
    negatives: np.ndarray  # (B, k) int64


class AsymmetricTupleMiner:
    """Mines one positive and ``num_negatives`` hard negatives per query against teacher vectors.

    Args:
        clusters: ``(N,)`` cluster (finest class) id of every training image.
        num_negatives: ``k``, negatives per query (5 in the paper).
        pool_size: training images ranked per epoch; ``None`` ranks all of them.
        seed: seeds the pool and the positive draws.
        positives: optional official positives, ``{query position: positions}``.
    """

    def __init__(
        self,
        clusters: np.ndarray,
        num_negatives: int = 5,
        pool_size: int | None = None,
        seed: int = 0,
        positives: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.num_negatives = int(num_negatives)
        self.pool_size = None if pool_size is None else int(pool_size)
        self.seed = int(seed)
        self.positives = {int(q): np.asarray(p, dtype=np.int64) for q, p in (positives or {}).items()}
        order = np.argsort(self.clusters, kind="stable")
        bounds = np.flatnonzero(np.diff(self.clusters[order])) + 1
        self._members = dict(zip(self.clusters[order][np.r_[0, bounds]].tolist(), np.split(order, bounds), strict=True))
        self._pool_epoch: int | None = None
        self._pool = np.arange(0)

    def pool(self, epoch: int) -> np.ndarray:
        """The sorted training positions ranked during ``epoch`` (all of them, or a seeded sample)."""
        if self._pool_epoch != epoch:
            count = len(self.clusters)
            if self.pool_size is None or self.pool_size >= count:
                self._pool = np.arange(count)
            else:
                rng = np.random.default_rng([self.seed, epoch, 1])
                self._pool = np.sort(rng.choice(count, size=self.pool_size, replace=False))
            self._pool_epoch = epoch
        return self._pool

    @torch.no_grad()
    def mine(
        self, queries: torch.Tensor, query_positions: np.ndarray, pool_vectors: torch.Tensor, *, epoch: int, step: int
    ) -> MinedTuples:
        """Mine tuples for a batch.

        Args:
            queries: ``(B, D)`` the student's embeddings of the batch (any device; detached here).
            query_positions: ``(B,)`` their training positions.
            pool_vectors: ``(P, D)`` the teacher's embeddings of ``pool(epoch)``, on the queries' device.
            epoch: the current epoch (selects the pool).
            step: the current step (seeds the positive draws).
        """
        pool = self.pool(epoch)
        query_positions = np.asarray(query_positions, dtype=np.int64)
        scores = queries.detach().float() @ pool_vectors.float().T  # (B, P)
        query_clusters = torch.as_tensor(self.clusters[query_positions], device=scores.device)
        pool_clusters = torch.as_tensor(self.clusters[pool], device=scores.device)
        scores[query_clusters[:, None] == pool_clusters[None, :]] = -torch.inf  # skip the query's own cluster
        order = torch.argsort(scores, dim=1, descending=True, stable=True).cpu().numpy()
        finite = torch.isfinite(scores).cpu().numpy()
        negatives = np.full((len(query_positions), self.num_negatives), -1, dtype=np.int64)
        for row in range(len(query_positions)):
            negatives[row] = self._hardest_one_per_cluster(order[row], finite[row], pool)
        return MinedTuples(self._draw_positives(query_positions, step), negatives)

    def _hardest_one_per_cluster(self, ranked: np.ndarray, finite: np.ndarray, pool: np.ndarray) -> np.ndarray:
        chosen = np.full(self.num_negatives, -1, dtype=np.int64)
        seen: set[int] = set()
        taken = 0
        for column in ranked:
            if not finite[column]:
                break  # the rest is the query's own cluster
            position = int(pool[column])
            cluster = int(self.clusters[position])
            if cluster in seen:
                continue
            seen.add(cluster)
            chosen[taken] = position
            taken += 1
            if taken == self.num_negatives:
                break
        return chosen

    def _draw_positives(self, query_positions: np.ndarray, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 2])
        positives = np.full(len(query_positions), -1, dtype=np.int64)
        for row, query in enumerate(query_positions.tolist()):
            official = self.positives.get(query)
            if official is not None and len(official):
                candidates = official
            else:
                members = self._members[int(self.clusters[query])]
                candidates = members[members != query]
            if len(candidates):
                positives[row] = int(candidates[rng.integers(len(candidates))])
        return positives
