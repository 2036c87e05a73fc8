"""Recall tuning of a FAISS index: the cheapest search parameters that reach a target recall@k.

Ground truth is an exact scan of the index's own stored (for PQ/SQ: decoded) vectors, so the recall measures
what the search parameter controls, the part of the index left unvisited, and not the compression loss no
parameter can undo. ``FaissIndex.tune`` is the entry point; the functions here take the ``FaissIndex``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from indexing.faiss_layers import faiss_lib, hnsw_of, ivf_of, refine_of, unwrap
from indexing.faiss_placement import knn_cap
from indexing.vector_checks import check_vectors
from indexing.vector_index import NO_ID, SearchParams, check_k

if TYPE_CHECKING:
    from indexing.faiss_index import FaissIndex

__all__ = [
    "K_FACTORS",
    "MAX_EF_SEARCH",
    "TuneResult",
    "exact_knn",
    "per_query_recall",
    "recall_at_k",
    "recall_lower_bound",
    "tune",
]

logger = logging.getLogger(__name__)

#: Largest efSearch ``tune`` tries.
MAX_EF_SEARCH = 4096
#: Re-ranking depths ``tune`` tries for refine indexes (candidates re-ranked = k * k_factor). Below 2
#: the refine store is wasted; above 64 re-ranking (a random access per candidate) costs more than
#: a wider base search.
K_FACTORS = (2, 4, 8, 16, 32, 64)
#: One-sided 95% normal quantile of ``recall_lower_bound``.
TUNE_CONFIDENCE_Z = 1.645


@dataclass(frozen=True)
class TuneResult:
    """What ``FaissIndex.tune`` chose.

    Attributes:
        params: the cheapest parameters that reached ``target_recall`` (or the largest tried if none did);
            for refine indexes the (nprobe or efSearch, k_factor) pair of least estimated cost.
        recall: recall@k measured with ``params`` against exact search over the index's own vectors.
        target_recall: the recall asked for.
        k: neighbours per query the recall is measured at.
        reached: whether ``lower_bound >= target_recall``.
        num_queries: queries the recall was averaged over.
        held_out: True when the queries were not stored in the index (held-out vectors), False when they
            were stored items left out of their own results.
        lower_bound: one-sided 95% lower confidence bound of ``recall`` over the queries
            (``recall_lower_bound``); tuning chooses by it, so real queries land at or above the target.
    """

    params: SearchParams
    recall: float
    target_recall: float
    k: int
    reached: bool
    num_queries: int
    held_out: bool = False
    lower_bound: float | None = None


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` ids present in the same row of ``found`` (NO_ID never counts)."""
    return float(per_query_recall(found, truth).mean()) if truth.size else 1.0


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(Q,)`` fraction of each row of ``truth`` ids present in the same row of ``found`` (NO_ID never counts)."""
    return np.array(
        [
            np.isin(t[t != NO_ID], f[f != NO_ID]).sum() / max((t != NO_ID).sum(), 1)
            for f, t in zip(found, truth, strict=True)
        ],
        dtype=np.float64,
    )


def recall_lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean of per-query recalls (normal approximation).

    Tuning accepts parameters whose bound, not whose sample mean, reaches the target: with the mean alone the
    chosen parameters sit on the edge, and real queries (another sample) land under the target about half the
    time (0.942-0.954 against 0.95 in ``bench_index.py``'s 1M runs). On 500 queries the margin is about 0.005.
    """
    if per_query.size < 2:
        return float(per_query.mean()) if per_query.size else 1.0
    spread = float(per_query.std(ddof=1) / np.sqrt(per_query.size))
    return float(per_query.mean()) - TUNE_CONFIDENCE_Z * spread


def tune(
    index: FaissIndex,
    queries: np.ndarray | None,
    target_recall: float,
    k: int,
    *,
    query_ids: np.ndarray | None,
    num_queries: int,
    seed: int,
    apply: bool,
) -> TuneResult:
    """``FaissIndex.tune`` (see there): doubling then bisection on the knob, the 95% lower bound deciding."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    k = check_k(k)
    if index.ntotal == 0:
        raise ValueError("cannot tune an empty index")
    exclude = None if query_ids is None else np.asarray(query_ids, dtype=np.int64).reshape(-1)
    if queries is None:
        all_ids = index.ids()
        rng = np.random.default_rng(seed)
        exclude = np.sort(rng.choice(all_ids, size=min(num_queries, all_ids.size), replace=False))
        queries = index.reconstruct(exclude)
    queries = check_vectors(queries, index.dim, "queries")
    if exclude is not None and exclude.shape != (len(queries),):
        raise ValueError(f"query_ids must have shape ({len(queries)},), got {exclude.shape}")
    extra = 0 if exclude is None else 1
    k_eff = min(k, index.ntotal - extra)
    if k_eff < 1:
        raise ValueError("the index holds too few vectors to tune")
    truth = _drop_self(exact_knn(index, queries, k_eff + extra)[1], exclude, k_eff)
    means: dict[SearchParams, float] = {}

    def measure(params: SearchParams) -> float:  # the bound decides; the mean is what is reported
        _, found = index.search(queries, k_eff + extra, params)
        per_query = per_query_recall(_drop_self(found, exclude, k_eff), truth)
        means[params] = float(per_query.mean()) if per_query.size else 1.0
        return recall_lower_bound(per_query)

    knob = _knob(index, k_eff + extra)
    if index.is_refine:
        params, recall = _tune_refine(index, knob, measure, target_recall, k_eff)
    elif knob is None:
        params = SearchParams()
        recall = measure(params)
    else:
        name, low, high = knob
        params, recall = _smallest_passing(lambda v: SearchParams(**{name: v}), measure, low, high, target_recall)
    bound, recall = recall, means[params]
    reached = bound >= target_recall
    if not reached:
        logger.warning(
            "tune: %s reaches recall@%d %.3f (95%% lower bound %.3f) < target %.3f",
            index.factory,
            k_eff,
            recall,
            bound,
            target_recall,
        )
    if apply and params.to_dict():
        index.set_default_params(params)
    return TuneResult(
        params, recall, float(target_recall), k_eff, reached, len(queries), held_out=exclude is None, lower_bound=bound
    )


def exact_knn(index: FaissIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the stored (decoded) vectors, scanned in chunks to bound memory."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.full((len(queries), 0), NO_ID, np.int64)

    def merge(chunk_ids: np.ndarray, chunk: np.ndarray) -> None:
        nonlocal best_s, best_i
        sims = queries @ chunk.T
        take = min(k, sims.shape[1])
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        scores = np.concatenate([best_s, np.take_along_axis(sims, top, axis=1)], axis=1)
        ids = np.concatenate([best_i, chunk_ids[top]], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    index.scan(merge)
    return best_s, best_i


def _knob(index: FaissIndex, k: int) -> tuple[str, int, int] | None:
    """The tunable parameter of this index type, with its smallest and largest useful value for ``k``."""
    ivf = ivf_of(index.faiss_index)
    if ivf is not None:
        return "nprobe", 1, knn_cap(int(ivf.nlist), index.on_gpu)
    if hnsw_of(index.faiss_index) is not None:
        return "ef_search", k, max(k, min(MAX_EF_SEARCH, index.ntotal))  # FAISS searches max(efSearch, k)
    return None


def _tune_refine(
    index: FaissIndex,
    knob: tuple[str, int, int] | None,
    measure: Callable[[SearchParams], float],
    target: float,
    k: int,
) -> tuple[SearchParams, float]:
    """The cheapest (nprobe or efSearch, k_factor) pair of a refine index reaching ``target``.

    "Cheapest" is the estimate of bytes a query reads (``_refine_costs``): the base index's codes
    it scans plus the ``k * k_factor`` refine-store vectors it re-ranks. A deterministic model rather
    than a timing, so the same build tunes the same way on a busy machine. For each k_factor, largest
    first, the smallest base parameter reaching the target is found by doubling and bisection; a
    smaller k_factor never needs a smaller base parameter, so each search starts where the previous
    one ended and stops where it could no longer beat the best pair found.
    """
    base_cost, refine_cost = _refine_costs(index, k)
    if knob is None:  # a flat base (e.g. "PQ32x4fs,RFlat"): only the re-ranking depth to choose
        return _smallest_passing(lambda v: SearchParams(k_factor=v), measure, 1, max(K_FACTORS), target)
    name, low, high = knob
    best: tuple[float, SearchParams, float] | None = None
    last: tuple[SearchParams, float] | None = None
    for k_factor in sorted(K_FACTORS, reverse=True):
        cap = high
        if best is not None:
            cap = min(high, int((best[0] - refine_cost * k_factor) / base_cost))
        if cap < low:
            break

        def make(value: int, k_factor: int = k_factor) -> SearchParams:
            return SearchParams(**{name: value, "k_factor": k_factor})

        params, recall = _smallest_passing(make, measure, low, cap, target)
        value = getattr(params, name)
        if last is None:
            last = (params, recall)
        if recall < target:
            low = cap + 1  # fails up to cap with this depth, so with any smaller depth too
            continue
        low = value
        cost = base_cost * value + refine_cost * k_factor
        if best is None or cost < best[0]:
            best = (cost, params, recall)
    if best is None:
        assert last is not None
        return last
    return best[1], best[2]


def _refine_costs(index: FaissIndex, k: int) -> tuple[float, float]:
    """Bytes read per query per unit of the base parameter, and per unit of k_factor (``k`` re-ranked vectors).

    IVF: one nprobe scans ``ntotal / nlist`` codes of the base's code size; HNSW: one efSearch step
    visits about ``2 M`` neighbours' codes; re-ranking reads ``k`` refine-store vectors per unit of k_factor.
    """
    faiss = faiss_lib()
    raw = index.faiss_index
    refine, base, ivf = refine_of(raw), unwrap(raw), ivf_of(raw)
    refine_cost = float(k * faiss.downcast_index(refine.refine_index).sa_code_size())
    if ivf is not None:
        base_cost = max(index.ntotal / max(int(ivf.nlist), 1), 1.0) * max(int(ivf.code_size), 1)
    else:
        hnsw = hnsw_of(raw)
        links = int(hnsw.nb_neighbors(0)) if hnsw is not None else 1
        storage = faiss.downcast_index(base.storage) if hnsw is not None else base
        base_cost = float(max(links, 1) * max(int(storage.sa_code_size()), 1))
    return base_cost, refine_cost


def _drop_self(ids: np.ndarray, exclude: np.ndarray | None, k: int) -> np.ndarray:
    """Each row without its own query id (when queries are stored vectors), cut to ``k`` columns."""
    if exclude is None:
        return ids[:, :k]
    out = np.full((ids.shape[0], k), NO_ID, np.int64)
    for row, (found, own) in enumerate(zip(ids, exclude, strict=True)):
        kept = found[found != own][:k]
        out[row, : kept.size] = kept
    return out


def _smallest_passing(
    make: Callable[[int], SearchParams],
    measure: Callable[[SearchParams], float],
    low: int,
    high: int,
    target: float,
) -> tuple[SearchParams, float]:
    """Smallest value in [low, high] whose recall reaches ``target``: doubling, then bisection."""
    value, last_fail = low, low - 1
    recall = measure(make(value))
    while recall < target and value < high:
        last_fail, value = value, min(2 * value, high)
        recall = measure(make(value))
    if recall < target:
        return make(value), recall
    best, best_recall = value, recall
    lo, hi = last_fail + 1, value - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        mid_recall = measure(make(mid))
        if mid_recall >= target:
            best, best_recall, hi = mid, mid_recall, mid - 1
        else:
            lo = mid + 1
    return make(best), best_recall
