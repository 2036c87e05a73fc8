"""k-NN search of a FAISS index restricted to allowed ids (what a label filter resolves to).

FAISS filters candidates itself with an ``IDSelectorBatch`` (``faiss_params.selector_parameters``), and checks
membership before it computes a distance, so a selective filter costs little. But an approximate search visits
a fixed share of the index, and the fewer items are allowed, the fewer of them that share holds: IVF with the
unfiltered nprobe then misses the best allowed items. So the search is widened by the inverse of the allowed
share (``widened_params``), visiting about as many allowed items as the unfiltered search visits items.

Per index type:

- IVF (bare, behind OPQ/PCA, fast-scan included): FAISS's filtered search with the widened nprobe; queries
  that still come back short of ``min(k, allowed)`` hits are searched again over every list.
- everything else, when at most ``SUBSET_SCAN_MAX`` ids are allowed: an exact scan of their stored vectors
  (Flat, HNSW, SQ, PQ, fast-scan and refine stores all reconstruct by position, without IVF's direct map).
- everything else, when more are allowed: FAISS's filtered search (Flat, SQ, HNSW with a widened efSearch),
  or, where FAISS has none (refine pairs, PQ), a k-NN search of growing depth whose hits are filtered.

Filtered searches always run on the CPU index, also when a GPU replica exists: FAISS's GPU indexes do not take
a selector, and with one the CPU search computes distances for the allowed items only.

The functions take the ``FaissIndex`` and use its ``_reconstruct_stored`` (a reconstruct that skips the
membership check the allowed set has already passed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from indexing.faiss_layers import ivf_of, numpy_method
from indexing.faiss_params import selector_parameters
from indexing.faiss_placement import knn_cap
from indexing.vector_checks import as_ids
from indexing.vector_index import NO_ID, LabelFilter, SearchParams

if TYPE_CHECKING:
    from indexing.faiss_index import FaissIndex

__all__ = [
    "EMPTY_SCORE",
    "MAX_FILTERED_EF_SEARCH",
    "SUBSET_SCAN_MAX",
    "empty_hits",
    "filtered_search",
    "refuse_where",
    "stored_subset",
    "subset_similarities",
    "widened_params",
]

#: Score of an empty result slot (what FAISS writes for inner product: -FLT_MAX).
EMPTY_SCORE = float(np.finfo(np.float32).min)
#: Largest efSearch a filtered HNSW search widens to (``widened_params``), unless the call asks for more.
MAX_FILTERED_EF_SEARCH = 4096
#: Largest set of allowed ids a non-IVF index scans exactly over their stored vectors (32 MiB at 512-d); larger
#: sets go through FAISS's selector or the growing k-NN search. IVF indexes never scan (their direct map would
#: be rebuilt per call: 21 ms at 100k items here); over every list their selector search is exact over the codes.
SUBSET_SCAN_MAX = 16_384


def empty_hits(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of ``queries`` rows of ``k`` empty slots, as FAISS fills them."""
    return np.full((queries, k), EMPTY_SCORE, np.float32), np.full((queries, k), NO_ID, np.int64)


def stored_subset(index: FaissIndex, allowed_ids: Any) -> np.ndarray:
    """The distinct ids of ``allowed_ids`` that ``index`` stores, sorted (absent ones are dropped).

    Raises:
        ValueError: ``allowed_ids`` is not a 1-D integer array.
    """
    allowed = np.unique(as_ids(allowed_ids, "allowed_ids"))
    return allowed[np.isin(allowed, index.ids())]


def subset_similarities(index: FaissIndex, queries: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``(Q, len(allowed))`` inner products of the queries with the stored (decoded) vectors of ``allowed``.

    These are the scores the index itself gives: exact for Flat, HNSW and IVF-Flat, the decoded vectors' for
    PQ / SQ (which asymmetric distance computation equals), the refine store's for refine pairs.
    """
    return queries @ index._reconstruct_stored(allowed).T


def filtered_search(
    index: FaissIndex, queries: np.ndarray, k: int, params: SearchParams | None, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(k, ntotal)`` best hits per query among ``allowed`` (sorted stored ids), empty slots last."""
    k = min(k, index.ntotal)
    if k == 0 or queries.shape[0] == 0 or allowed.size == 0:
        return empty_hits(queries.shape[0], k)
    ivf = ivf_of(index.faiss_index)
    if ivf is not None and not index.is_refine:
        found = _selector_search(index, queries, k, widened_params(index, params, allowed), allowed)
        if found is not None:
            scores, ids = found
            short = np.flatnonzero((ids != NO_ID).sum(axis=1) < min(k, allowed.size))
            if short.size:  # the visited lists held too few allowed items: visit them all
                again = _selector_search(index, queries[short], k, SearchParams(nprobe=int(ivf.nlist)), allowed)
                if again is not None:
                    scores[short], ids[short] = again
            return scores, ids
    if allowed.size <= SUBSET_SCAN_MAX:
        return _subset_search(index, queries, k, allowed)
    found = _selector_search(index, queries, k, widened_params(index, params, allowed), allowed)
    return found if found is not None else _grown_search(index, queries, k, params, allowed)


def widened_params(index: FaissIndex, params: SearchParams | None, allowed: np.ndarray) -> SearchParams:
    """``params`` (or the defaults) with nprobe / efSearch scaled by ``ntotal / len(allowed)``, within bounds.

    The approximate search then visits about as many allowed items as it visits items unfiltered; nprobe goes
    up to every list, efSearch up to ``MAX_FILTERED_EF_SEARCH``.
    """
    defaults = index.default_params
    nprobe = params.nprobe if params is not None and params.nprobe is not None else defaults.nprobe
    ef_search = params.ef_search if params is not None and params.ef_search is not None else defaults.ef_search
    scale = index.ntotal / max(int(allowed.size), 1)
    if nprobe is not None:
        nprobe = min(int(index.nlist or nprobe), max(nprobe, math.ceil(nprobe * scale)))
    if ef_search is not None:
        ef_search = min(max(ef_search, MAX_FILTERED_EF_SEARCH), max(ef_search, math.ceil(ef_search * scale)))
    return SearchParams(nprobe=nprobe, ef_search=ef_search)


def _selector_search(
    index: FaissIndex, queries: np.ndarray, k: int, params: SearchParams | None, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """FAISS's own filtered search on the CPU index, or None where the index type has none."""
    selector_params = selector_parameters(index.faiss_index, params, allowed)
    if selector_params is None:
        return None
    try:
        scores, ids = numpy_method(index.faiss_index, "search")(queries, k, params=selector_params)
    except RuntimeError:  # e.g. IndexPQ, PQ fast-scan without IVF: "search params not supported"
        return None
    return _keep_allowed(scores.astype(np.float32), ids.astype(np.int64), allowed)


def _subset_search(
    index: FaissIndex, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over the stored (decoded) vectors of the ``allowed`` ids, ties by id."""
    sims = subset_similarities(index, queries, allowed)
    take = min(k, allowed.size)
    top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
    scores, ids = np.take_along_axis(sims, top, axis=1), allowed[top]
    order = np.lexsort((ids, -scores), axis=-1)
    out_scores, out_ids = empty_hits(queries.shape[0], k)
    out_scores[:, :take] = np.take_along_axis(scores, order, axis=1)
    out_ids[:, :take] = np.take_along_axis(ids, order, axis=1)
    return out_scores, out_ids


def _grown_search(
    index: FaissIndex, queries: np.ndarray, k: int, params: SearchParams | None, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """k-NN searches with a doubling depth, filtered to ``allowed``, until each query has ``k`` allowed hits.

    The first depth is twice the one that holds ``k`` allowed items on average. A query stops early when the
    index returns fewer hits than asked (nothing more to find), and at the deepest search allowed (all items on
    CPU, ``GPU_MAX_K`` on a GPU replica).
    """
    cap = knn_cap(index.ntotal, index.on_gpu)
    wanted = min(k, allowed.size)
    out_scores, out_ids = empty_hits(queries.shape[0], k)
    pending = np.arange(queries.shape[0])
    depth = min(cap, max(k, -(-2 * k * index.ntotal // allowed.size)))
    while pending.size:
        scores, ids = index.search(queries[pending], depth, params)
        keep = np.isin(ids, allowed)
        done = (keep.sum(axis=1) >= wanted) | (depth >= cap) | (ids[:, -1] == NO_ID)
        for row in np.flatnonzero(done):
            hit_scores, hit_ids = scores[row][keep[row]][:k], ids[row][keep[row]][:k]
            out_scores[pending[row], : hit_ids.size] = hit_scores
            out_ids[pending[row], : hit_ids.size] = hit_ids
        pending = pending[~done]
        depth = min(2 * depth, cap)
    return out_scores, out_ids


def _keep_allowed(scores: np.ndarray, ids: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empty every slot whose id is not in ``allowed``, moving the kept hits to the front in their order.

    A guard: FAISS's selector already excludes them, and this keeps that true whatever a FAISS build does.
    """
    kept = np.isin(ids, allowed)
    order = np.argsort(~kept, axis=1, kind="stable")
    kept = np.take_along_axis(kept, order, axis=1)
    scores = np.where(kept, np.take_along_axis(scores, order, axis=1), EMPTY_SCORE).astype(np.float32)
    return scores, np.where(kept, np.take_along_axis(ids, order, axis=1), NO_ID)


def refuse_where(where: LabelFilter | None) -> None:
    """FAISS stores no labels: a label filter reaching it is a caller's mistake.

    Raises:
        ValueError: ``where`` is set.
    """
    if where is not None:
        raise ValueError(
            f"the faiss backend stores no labels, so it cannot apply the filter {where}: "
            "the index directory resolves label filters to ids (allowed_ids)"
        )
