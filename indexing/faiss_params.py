"""Search parameters of a FAISS index: the engine's ``SearchParams`` as FAISS ``SearchParameters`` objects.

Per-call parameters go through FAISS's ``SearchParameters`` classes rather than by setting ``nprobe`` on the
index, which would race with concurrent searches. The index's own values are its defaults, saved with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from indexing.faiss_layers import faiss_lib, hnsw_of, ivf_of, refine_of
from indexing.vector_index import SearchParams

__all__ = ["default_params", "search_parameters", "selector_parameters", "set_default_params"]


def search_parameters(index: Any, params: SearchParams | None, factory: str) -> Any:
    """FAISS ``SearchParameters`` for one call on ``index`` (the CPU FAISS object), or None for its defaults.

    Raises:
        ValueError: a parameter that does not apply to this index type (``factory`` names it in the message).
    """
    if params is None or not params.to_dict():
        return None
    faiss = faiss_lib()
    ivf, hnsw, refine = ivf_of(index), hnsw_of(index), refine_of(index)
    if params.nprobe is not None and ivf is None:
        raise ValueError(f"nprobe applies to IVF indexes; {factory!r} is not one")
    if params.ef_search is not None and hnsw is None:
        raise ValueError(f"ef_search applies to HNSW indexes; {factory!r} is not one")
    if params.k_factor is not None and refine is None:
        raise ValueError(f"k_factor applies to refine indexes (...,RFlat / ...,Refine(...)); {factory!r} is not one")
    base = None
    if params.nprobe is not None:
        base = faiss.SearchParametersIVF()
        base.nprobe = min(int(params.nprobe), int(ivf.nlist))
    elif params.ef_search is not None:
        base = faiss.SearchParametersHNSW()
        base.efSearch = int(params.ef_search)
    if refine is None:
        return base
    out = faiss.IndexRefineSearchParameters()
    out.k_factor = float(params.k_factor if params.k_factor is not None else refine.k_factor)
    if base is not None:
        out.base_index_params = base
        out.referenced = base  # the SWIG field holds a bare pointer: keep the Python object alive with it
    return out


def selector_parameters(index: Any, params: SearchParams | None, allowed: np.ndarray) -> Any:
    """``SearchParameters`` restricting a search of ``index`` to the ids ``allowed``, or None where FAISS cannot.

    FAISS filters with an ``IDSelectorBatch`` (a Bloom filter over a hash set) in Flat, SQ, HNSW and IVF
    indexes (fast-scan ones included), through an id map or a pre-transform. The parameters object replaces the
    index's own nprobe / efSearch for the call, so those are copied in. Refine indexes refuse a selector (and
    would apply it before re-ranking), so they get None and the caller's fallback.
    """
    if refine_of(index) is not None:
        return None
    faiss = faiss_lib()
    ivf, hnsw = ivf_of(index), hnsw_of(index)
    if ivf is not None:
        out = faiss.SearchParametersIVF()
        nprobe = params.nprobe if params is not None and params.nprobe is not None else ivf.nprobe
        out.nprobe = min(int(nprobe), int(ivf.nlist))
    elif hnsw is not None:
        out = faiss.SearchParametersHNSW()
        ef_search = params.ef_search if params is not None and params.ef_search is not None else hnsw.efSearch
        out.efSearch = int(ef_search)
    else:
        out = faiss.SearchParameters()
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    out.sel = selector
    out.referenced = selector  # the SWIG field holds a bare pointer: keep the selector alive with it
    return out


def default_params(index: Any) -> SearchParams:
    """The search parameters stored in ``index`` (and saved with it)."""
    ivf, hnsw, refine = ivf_of(index), hnsw_of(index), refine_of(index)
    return SearchParams(
        nprobe=None if ivf is None else int(ivf.nprobe),
        ef_search=None if hnsw is None else int(hnsw.efSearch),
        k_factor=None if refine is None else max(1, round(float(refine.k_factor))),
    )


def set_default_params(index: Any, gpu: Any, params: SearchParams, factory: str) -> None:
    """Store ``params`` in ``index`` and in its GPU replica ``gpu`` (None when there is none).

    Raises:
        ValueError: a parameter that does not apply to this index type.
    """
    search_parameters(index, params, factory)  # validates that they apply to this index type
    faiss = faiss_lib()
    for name, value in params.to_dict().items():
        if name == "k_factor":  # ParameterSpace's name for IndexRefine's (its "k_factor" is IVFPQR's)
            refine_of(index).k_factor = float(value)
            continue
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        if gpu is not None:
            faiss.GpuParameterSpace().set_index_parameter(gpu, name, value)
