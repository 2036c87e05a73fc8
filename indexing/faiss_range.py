"""Range search of a FAISS index: every stored vector above a similarity threshold, with a k-NN fallback.

FAISS's range search is used where it exists (CPU Flat, IVF, HNSW, PQ, SQ ...); with a GPU replica it runs on
the CPU copy, since FAISS's GPU indexes have none. Sharded indexes and a few CPU types (NSG, PQ fast-scan) lack
it, and refine pairs must not use it (it would filter on the base index's approximate scores, not the re-ranked
ones ``search`` returns); there a k-NN search is repeated with a doubling k until every query's k-th hit falls
below the threshold. Restricted to allowed ids, the choice follows ``faiss_filter``'s for k-NN search.

The functions take the ``FaissIndex`` and queries it has already checked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from indexing.faiss_filter import SUBSET_SCAN_MAX, filtered_search, subset_similarities, widened_params
from indexing.faiss_layers import ivf_of, numpy_method
from indexing.faiss_params import search_parameters, selector_parameters
from indexing.faiss_placement import knn_cap
from indexing.vector_index import NO_ID, RangeSearchResult, SearchParams

if TYPE_CHECKING:
    from indexing.faiss_index import FaissIndex

__all__ = ["RANGE_FALLBACK_K", "knn_range_search", "range_search", "sorted_range_result", "supports_range_search"]

logger = logging.getLogger(__name__)

#: First k of the k-NN range-search fallback; doubled until the k-th hit falls below the threshold.
RANGE_FALLBACK_K = 64


def supports_range_search(index: FaissIndex) -> bool:
    """Whether FAISS implements range search for this index type on CPU (see the module docstring)."""
    if index.is_refine:
        return False
    try:
        numpy_method(index.faiss_index, "range_search")(np.zeros((0, index.dim), np.float32), 0.0)
    except RuntimeError:
        return False
    return True


def range_search(
    index: FaissIndex,
    queries: np.ndarray,
    threshold: float,
    params: SearchParams | None,
    *,
    method: str,
    allowed: np.ndarray | None,
) -> RangeSearchResult:
    """``FaissIndex.range_search`` on checked queries; ``allowed`` is None or the sorted allowed stored ids.

    Raises:
        ValueError: bad parameters or method, or ``method="native"`` where FAISS has no range search.
    """
    faiss_params = search_parameters(index.faiss_index, params, index.factory)
    if method not in ("auto", "native", "knn"):
        raise ValueError(f"method must be 'auto', 'native' or 'knn', got {method!r}")
    native = method != "knn" and supports_range_search(index)
    if method == "native" and not native:
        raise ValueError(f"{index!r} has no native range search")
    if allowed is not None:
        return _filtered_range_search(index, queries, threshold, params, allowed, method=method, native=native)
    if native:
        lims, scores, ids = numpy_method(index.faiss_index, "range_search")(queries, threshold, params=faiss_params)
        return sorted_range_result(lims, scores, ids, fallback=False)
    if method == "auto":
        logger.warning(
            "range search is not available for %s; using k-NN search with a growing k filtered at %.4f",
            index.factory,
            threshold,
        )
    return knn_range_search(index, queries, threshold, params)


def _filtered_range_search(
    index: FaissIndex,
    queries: np.ndarray,
    threshold: float,
    params: SearchParams | None,
    allowed: np.ndarray,
    *,
    method: str,
    native: bool,
) -> RangeSearchResult:
    """Range search among ``allowed``: FAISS's with a selector, an exact subset scan, or the k-NN fallback.

    IVF indexes use FAISS's (over every list when few ids are allowed: exact over the codes, and cheap, since
    the selector is checked before any distance); other types scan a small allowed set exactly and hand a
    large one to FAISS's filtered range search with widened parameters (``faiss_filter.widened_params``).
    """
    if not allowed.size:
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int64))
        return RangeSearchResult.from_hits([empty] * len(queries), fallback=method == "knn")
    ivf = ivf_of(index.faiss_index)
    small = allowed.size <= SUBSET_SCAN_MAX
    if native and (ivf is not None or not small or method == "native"):
        search_params = widened_params(index, params, allowed)
        if ivf is not None and small:
            search_params = SearchParams(nprobe=int(ivf.nlist))
        found = _selector_range_search(index, queries, threshold, search_params, allowed)
        if found is not None:
            return found
        if method == "native":
            raise ValueError(f"{index!r} has no native range search restricted to allowed ids")
    if method != "knn" and small:
        hits = []
        for sims in subset_similarities(index, queries, allowed):
            keep = np.flatnonzero(sims > threshold)
            order = np.lexsort((allowed[keep], -sims[keep]))
            hits.append((sims[keep][order], allowed[keep][order]))
        return RangeSearchResult.from_hits(hits, fallback=False)
    return knn_range_search(index, queries, threshold, params, allowed)


def _selector_range_search(
    index: FaissIndex, queries: np.ndarray, threshold: float, params: SearchParams, allowed: np.ndarray
) -> RangeSearchResult | None:
    """FAISS's range search filtered by an ``IDSelectorBatch``, or None where the index type cannot filter."""
    selector_params = selector_parameters(index.faiss_index, params, allowed)
    if selector_params is None:
        return None
    try:
        search = numpy_method(index.faiss_index, "range_search")
        lims, scores, ids = search(queries, threshold, params=selector_params)
    except RuntimeError:
        return None
    return _filtered_lims(lims, scores, ids, np.isin(ids, allowed))  # a guard: the selector excluded the others


def knn_range_search(
    index: FaissIndex,
    queries: np.ndarray,
    threshold: float,
    params: SearchParams | None,
    allowed: np.ndarray | None = None,
) -> RangeSearchResult:
    """Range search by k-NN searches with a doubling k (among ``allowed`` when given), filtered at ``threshold``."""
    limit = index.ntotal if allowed is None else int(allowed.size)
    cap = knn_cap(limit, index.on_gpu)
    hits: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, np.int64))] * len(queries)
    pending = np.arange(len(queries))
    k = min(RANGE_FALLBACK_K, cap)
    truncated = 0
    while pending.size and k > 0:
        if allowed is None:
            scores, ids = index.search(queries[pending], k, params)
        else:
            scores, ids = filtered_search(index, queries[pending], k, params, allowed)
        complete = (ids[:, -1] == NO_ID) | (scores[:, -1] <= threshold)
        exhausted = complete | (k >= cap)
        truncated += int((exhausted & ~complete).sum()) if cap < limit else 0
        for row in np.flatnonzero(exhausted):
            keep = (ids[row] != NO_ID) & (scores[row] > threshold)
            hits[pending[row]] = (scores[row][keep], ids[row][keep])
        pending = pending[~exhausted]
        k = min(2 * k, cap)
    if truncated:
        logger.warning("k-NN range search on GPU stops at k=%d: %d queries have more hits", cap, truncated)
    return RangeSearchResult.from_hits(hits, fallback=True)


def sorted_range_result(lims: np.ndarray, scores: np.ndarray, ids: np.ndarray, fallback: bool) -> RangeSearchResult:
    """FAISS returns range hits unordered; sort each query's hits by descending score (ties by id)."""
    lims = np.asarray(lims, dtype=np.int64)
    scores, ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
    query = np.repeat(np.arange(lims.size - 1), np.diff(lims))
    order = np.lexsort((ids, -scores, query))
    return RangeSearchResult(lims, scores[order], ids[order], fallback=fallback)


def _filtered_lims(lims: np.ndarray, scores: np.ndarray, ids: np.ndarray, kept: np.ndarray) -> RangeSearchResult:
    """The sorted range result of the hits marked ``kept``."""
    lims = np.asarray(lims, dtype=np.int64)
    query = np.repeat(np.arange(lims.size - 1), np.diff(lims))
    new_lims = np.zeros_like(lims)
    new_lims[1:] = np.cumsum(np.bincount(query[kept], minlength=lims.size - 1))
    return sorted_range_result(new_lims, scores[kept], ids[kept], fallback=False)
