"""Ranking metrics as pure numpy functions: rankings, relevance, Recall@K (hit rate), all-positives AP and ASI.

The functions work on one label level at a time and on one block of queries at a time, so that
:mod:`retrieval.evaluation.protocols` can stream a large query set through them in chunks while
tests check them on hand-written rankings. They hold no state (a :class:`RankWorkspace` only lends
memory) and never normalise or re-score:
a *ranking* is decided once, by :func:`rank_by_similarity`, and every metric reads the boolean
*relevance* matrix that follows from it (row = query, column = rank position, ``True`` = relevant).

Conventions shared by every function here:

* Higher score = more similar (inner product of L2-normalised embeddings).
* Ties are broken deterministically by the lower gallery index, so a metric never depends on the
  sorting algorithm or on how queries were chunked.
* A query with no relevant item has no defined Recall@K, AP or ASI; it is left out of the means and
  reported as NaN by the per-query functions (the caller counts how many queries took part).
* AP uses *all* positives of the query (the classic retrieval mAP), not MAP@R and not AP@K.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "RankWorkspace",
    "average_precision",
    "average_search_index",
    "check_ks",
    "first_relevant_rank",
    "hits_at_k",
    "mean_average_precision",
    "rank_by_similarity",
    "ranked_relevance",
    "recall_at_k",
    "relevance_of_ranking",
]


class RankWorkspace:
    """Reusable buffers for :func:`rank_by_similarity` when ranking many chunks of the same width.

    Ranking a chunk needs a ``(Q, G)`` int64 key array and an int32 scratch array. Allocating them
    afresh for every chunk costs more than the sort itself on machines where first-touching memory is
    slow, so the protocol keeps one workspace for the whole run. A ranking returned with a workspace
    is a view into it and is overwritten by the next call.
    """

    def __init__(self) -> None:
        self._keys = np.empty((0, 0), dtype=np.int64)
        self._scratch = np.empty((0, 0), dtype=np.int32)

    def buffers(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """An int64 key array and an int32 scratch array of ``shape``, grown only when needed."""
        rows, cols = shape
        if self._keys.shape[1] != cols or self._keys.shape[0] < rows:
            self._keys = np.empty((rows, cols), dtype=np.int64)
            self._scratch = np.empty((rows, cols), dtype=np.int32)
        return self._keys[:rows], self._scratch[:rows]


_EXCLUDED_KEY = np.iinfo(np.int64).max


def rank_by_similarity(
    scores: np.ndarray,
    exclude: np.ndarray | None = None,
    *,
    workspace: RankWorkspace | None = None,
) -> np.ndarray:
    """Gallery indices per query, most similar first, ties broken by the lower gallery index.

    The tie rule matters because near-duplicate images produce exactly equal scores, and an
    order left to the sorting algorithm would make R@1 depend on the platform or on how queries
    were chunked. ``-0.0`` and ``0.0`` count as equal.

    For float32 scores each (score, index) pair is packed into one int64 key that sorts in the
    wanted order, so a fast unstable sort gives the same result as a stable argsort (several times
    faster on large galleries). Other dtypes use a stable argsort.

    Args:
        scores: ``(Q, G)`` similarities, higher = more similar. NaN is rejected.
        exclude: gallery items to drop from each query's ranking (leave-one-out drops the query
            itself). Either a ``(Q, G)`` boolean mask dropping the same number of items from every
            row (so the result stays rectangular), or a ``(Q,)`` integer array naming one gallery
            index per query.
        workspace: optional reusable buffers; the result is then a view into them, valid until the
            workspace is used again.

    Returns:
        ``(Q, G - n_excluded)`` int64 gallery indices in rank order.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (Q, G), got {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank (check the embeddings for NaN/inf values)")
    num_queries, width = scores.shape
    mask, single, dropped = _parse_exclude(exclude, scores.shape)
    packable = np.issubdtype(scores.dtype, np.floating) and scores.dtype.itemsize <= 4 and width < 2**32
    if not packable:
        order = np.argsort(-scores.astype(np.float64, copy=False), axis=1, kind="stable")
        if dropped == 0:
            return order
        if single is not None:
            mask = np.zeros(scores.shape, dtype=bool)
            mask[np.arange(num_queries), single] = True
        keep = ~np.take_along_axis(mask, order, axis=1)
        return order[keep].reshape(num_queries, width - dropped)

    keys, scratch = (workspace or RankWorkspace()).buffers(scores.shape)
    _descending_keys(np.asarray(scores, dtype=np.float32), keys, scratch)
    if single is not None:
        keys[np.arange(num_queries), single] = _EXCLUDED_KEY  # sorts after every real key
    elif mask is not None:
        keys[mask] = _EXCLUDED_KEY
    keys.sort(axis=1)
    np.bitwise_and(keys, 0xFFFFFFFF, out=keys)  # low 32 bits = gallery index
    return keys[:, : width - dropped]


def _parse_exclude(
    exclude: np.ndarray | None, shape: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """Validate ``exclude``; return (bool mask or None, per-row index or None, items dropped per row)."""
    if exclude is None:
        return None, None, 0
    exclude = np.asarray(exclude)
    if exclude.dtype == bool:
        if exclude.shape != shape:
            raise ValueError(f"exclude mask must have the shape of scores {shape}, got {exclude.shape}")
        per_row = exclude.sum(axis=1)
        if per_row.size and (per_row != per_row[0]).any():
            raise ValueError("exclude mask must drop the same number of gallery items from every query")
        return exclude, None, int(per_row[0]) if per_row.size else 0
    if not np.issubdtype(exclude.dtype, np.integer) or exclude.shape != (shape[0],):
        raise ValueError(f"exclude must be a ({shape[0]}, {shape[1]}) bool mask or ({shape[0]},) gallery indices")
    if exclude.size and (exclude.min() < 0 or exclude.max() >= shape[1]):
        raise ValueError(f"exclude indices must lie in [0, {shape[1]})")
    return None, exclude.astype(np.int64, copy=False), 1


def _descending_keys(scores: np.ndarray, keys: np.ndarray, scratch: np.ndarray) -> None:
    """Write int64 keys whose ascending order is (score descending, gallery index ascending).

    Read as a signed int, a float32 bit pattern orders non-negative floats ascending and negative
    ones descending; XOR-ing the low 31 bits of negatives fixes that (the classic radix-sort trick),
    and bitwise NOT reverses it to descending. Adding 0.0 first turns -0.0 into 0.0 so the two tie.
    Shifting up 32 bits and adding the index makes every key unique, so any sort yields the tie rule.
    """
    np.add(scores, np.float32(0.0), out=scratch.view(np.float32))
    np.copyto(keys, scratch)  # sign-extended bit patterns
    np.right_shift(scratch, 31, out=scratch)  # -1 for negative floats, 0 otherwise
    np.bitwise_and(scratch, 0x7FFFFFFF, out=scratch)
    np.bitwise_xor(keys, scratch, out=keys)  # ascending float order
    np.invert(keys, out=keys)  # descending float order
    np.multiply(keys, np.int64(1 << 32), out=keys)
    np.add(keys, np.arange(scores.shape[1], dtype=np.int64), out=keys)


def relevance_of_ranking(ranking: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Boolean ``(Q, R)`` matrix: is the item at each rank position relevant to its query?

    Args:
        ranking: ``(Q, R)`` gallery indices in rank order (from :func:`rank_by_similarity`).
        query_labels: ``(Q,)`` class ids of the queries at one label level.
        gallery_labels: ``(G,)`` class ids of the gallery at the same level.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    if query_labels.ndim != 1 or gallery_labels.ndim != 1:
        raise ValueError("query_labels and gallery_labels must be 1-D (one label level at a time)")
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != query_labels.shape[0]:
        raise ValueError(f"ranking must have shape ({query_labels.shape[0]}, R), got {ranking.shape}")
    return gallery_labels[ranking] == query_labels[:, None]


def ranked_relevance(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Rank the gallery for each query and mark the relevant positions (same label at this level).

    Convenience composition of :func:`rank_by_similarity` and :func:`relevance_of_ranking` for a
    single label level; see those for the arguments.
    """
    return relevance_of_ranking(rank_by_similarity(scores, exclude), query_labels, gallery_labels)


def _check_relevance(relevance: np.ndarray) -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.ndim != 2:
        raise ValueError(f"relevance must have shape (Q, R), got {relevance.shape}")
    return relevance.astype(bool, copy=False)


def first_relevant_rank(relevance: np.ndarray) -> np.ndarray:
    """0-based rank of each query's first relevant item, or -1 when it has none.

    Every Recall@K is a threshold on this one number, so the protocol computes it once per chunk.
    """
    relevance = _check_relevance(relevance)
    if relevance.shape[1] == 0:
        return np.full(relevance.shape[0], -1, dtype=np.int64)
    first = np.argmax(relevance, axis=1).astype(np.int64)
    first[~relevance.any(axis=1)] = -1
    return first


def hits_at_k(relevance: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Per-query hit indicators: ``(Q, len(ks))`` bool, True when a relevant item is in the top K.

    A K larger than the ranking simply means "anywhere in the ranking".
    """
    ks = check_ks(ks)
    first = first_relevant_rank(relevance)
    found = first >= 0
    return found[:, None] & (first[:, None] < np.asarray(ks, dtype=np.int64)[None, :])


def recall_at_k(relevance: np.ndarray, k: int) -> float:
    """Recall@K as the hit rate: fraction of queries with at least one relevant item in the top K.

    This is the CMC-style "R@K" of metric-learning papers (CUB, Cars, SOP, In-Shop), not the
    fraction of all relevant items retrieved. Queries with no relevant item at all are left out of
    the mean (their R@K is undefined, and counting them as misses would punish the dataset, not the
    model). Returns NaN when no query has a relevant item.
    """
    relevance = _check_relevance(relevance)
    valid = relevance.any(axis=1)
    if not valid.any():
        return float("nan")
    return float(hits_at_k(relevance[valid], [k])[:, 0].mean())


def average_precision(relevance: np.ndarray) -> np.ndarray:
    """Per-query average precision over *all* relevant items of the ranking (float64, NaN if none).

    ``AP = (1/P) * sum_j precision@rank(j)`` over the query's P relevant items, where ``rank(j)``
    is the 1-based position of the j-th relevant item, so precision there is ``j / rank(j)``. The
    ranking must contain every gallery item (minus excluded ones): truncating it would turn this
    into AP@K. Only the relevant positions are touched, so memory is O(number of positives), not
    another ``(Q, R)`` float matrix.
    """
    relevance = _check_relevance(relevance)
    num_queries = relevance.shape[0]
    rows, cols = np.nonzero(relevance)  # row-major: positives of a row come out in rank order
    counts = np.bincount(rows, minlength=num_queries)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    nth_positive = np.arange(rows.size) - starts[rows] + 1
    precision = nth_positive / (cols + 1.0)
    sums = np.bincount(rows, weights=precision, minlength=num_queries)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = sums / counts
    ap[counts == 0] = np.nan
    return ap


def average_search_index(relevance: np.ndarray) -> np.ndarray:
    """Per-query Average Search Index of the DyML paper (float64, NaN for a query with no relevant item).

    With R relevant items for the query, ``ASI = (1/R) * sum_{n=1..R} |top-n ∩ relevant| / n``: the
    precision at every cut-off up to R, averaged. Unlike AP, a positive ranked below R earns nothing,
    so ASI measures how much of the ideal top-R list is right, cut-off by cut-off (1 = all positives
    first, 0 = none of them in the top R).

    A positive at 1-based rank ``p <= R`` is counted in every term ``n = p..R``, so the sum equals
    ``sum_{positives at p <= R} (H_R - H_{p-1})`` with ``H`` the harmonic numbers (the cumulative sum
    of ``1/n`` over rank positions). Only the relevant positions are touched, as in
    :func:`average_precision`: memory is O(number of positives + ranking length), never another
    ``(Q, R)`` float matrix. The ranking must be complete (every non-excluded gallery item), else R
    is undercounted.
    """
    relevance = _check_relevance(relevance)
    num_queries, width = relevance.shape
    rows, cols = np.nonzero(relevance)
    counts = np.bincount(rows, minlength=num_queries)
    harmonic = np.zeros(width + 1, dtype=np.float64)  # harmonic[n] = H_n = sum_{i=1..n} 1/i
    np.cumsum(1.0 / np.arange(1, width + 1, dtype=np.float64), out=harmonic[1:])
    num_relevant = counts[rows]
    inside = cols < num_relevant  # 1-based rank cols + 1 <= R
    rows, cols, num_relevant = rows[inside], cols[inside], num_relevant[inside]
    sums = np.bincount(rows, weights=harmonic[num_relevant] - harmonic[cols], minlength=num_queries)
    with np.errstate(invalid="ignore", divide="ignore"):
        asi = sums / counts
    asi[counts == 0] = np.nan
    return asi


def mean_average_precision(relevance: np.ndarray) -> float:
    """mAP over all positives, averaged over queries that have at least one relevant item (NaN if none)."""
    ap = average_precision(relevance)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def check_ks(ks: Sequence[int]) -> list[int]:
    """Validate Recall@K cut-offs (positive integers, at least one) and return them as plain ints."""
    ks = list(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every K must be a positive integer, got {k!r}")
    return [int(k) for k in ks]
