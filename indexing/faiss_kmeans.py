"""Two-level k-means for the coarse quantiser of a large IVF index.

A flat k-means over 4096+ centroids costs O(sample x nlist x d) per iteration, tens of minutes on two cores at
1M x 512; clustering into ~sqrt(nlist) groups first and then each group into its share of the lists costs about
2 sqrt(nlist) instead of nlist distance computations per point and iteration (faiss.contrib.clustering, the
recipe FAISS uses for its billion-scale indexes). ``FaissIndex.train`` decides when to use it.
"""

from __future__ import annotations

import numpy as np

from indexing.faiss_layers import faiss_lib

__all__ = ["TWO_LEVEL_NITER", "two_level_kmeans"]

#: k-means iterations of each level of the two-level coarse training (FAISS's IVF default is 10 as well).
TWO_LEVEL_NITER = 10


def two_level_kmeans(vectors: np.ndarray, nlist: int, *, spherical: bool, seed: int) -> np.ndarray:
    """``nlist`` k-means centroids in two levels: ~sqrt(nlist) groups, then each group's share of the lists.

    Each group gets lists in proportion to its size (at least one, and no more than its points), so the
    final lists are balanced like a flat k-means's.

    Raises:
        RuntimeError: fewer distinct training vectors than lists.
    """
    faiss = faiss_lib()
    d = vectors.shape[1]
    groups = min(max(2, round(nlist**0.5)), len(vectors))
    top = faiss.Kmeans(d, groups, niter=TWO_LEVEL_NITER, spherical=spherical, seed=seed, max_points_per_centroid=2048)
    top.train(vectors)
    assign = top.index.search(vectors, 1)[1].ravel()
    sizes = np.bincount(assign, minlength=groups)
    shares = np.maximum(np.floor(sizes / sizes.sum() * nlist).astype(int), (sizes > 0).astype(int))
    shares = np.minimum(shares, sizes)
    for group in np.argsort(-sizes):  # hand out the rounding remainder to the largest groups
        if shares.sum() >= nlist:
            break
        shares[group] += min(nlist - shares.sum(), sizes[group] - shares[group])
    parts = []
    for group in np.flatnonzero(shares):
        members = np.ascontiguousarray(vectors[assign == group])
        if shares[group] == len(members):
            parts.append(members)
            continue
        sub = faiss.Kmeans(
            d, int(shares[group]), niter=TWO_LEVEL_NITER, spherical=spherical, seed=int(seed + 1 + group)
        )
        sub.train(members)
        parts.append(sub.centroids)
    centroids = np.ascontiguousarray(np.concatenate(parts)[:nlist], dtype=np.float32)
    if len(centroids) < nlist:
        raise RuntimeError(f"two-level k-means found {len(centroids)} of {nlist} lists: too few training vectors")
    return centroids
