"""What a FAISS index object is made of: its wrapper layers, and the concrete index each seam looks for.

A ``FaissIndex`` holds one CPU FAISS object: an ``IndexIDMap2`` around any non-IVF type, or an IVF index (behind
an optional OPQ/PCA pre-transform) that stores the ids in its lists; a refine pair (``...,RFlat``) sits under the
id map with its base index below it. Search parameters, tuning, GPU placement and range search each need the
layer that matters to them (the IVF, the HNSW graph, the refine wrapper); these functions find it. FAISS itself
is imported lazily, here, for the whole package: it is heavy, and a GPU build may replace the CPU one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = [
    "COARSE_EF_SEARCH",
    "faiss_lib",
    "has_pretransform",
    "hnsw_of",
    "is_fast_scan",
    "ivf_of",
    "layers",
    "numpy_method",
    "refine_of",
    "takes_ids_natively",
    "unwrap",
    "widen_coarse_search",
]

#: efSearch of the HNSW graph over IVF centroids ("IVF4096_HNSW32"). FAISS's default of 16 sends ~3% of
#: vectors to a list that is not their nearest when they are added (measured on bench_index.py's 512-d
#: vectors, 4096 centroids: 96.9% exact at 16, 99.4% at 32, 99.97% at 64), which caps recall@10 near
#: 0.93 whatever nprobe; 64 costs a few more distance computations per add and per query.
COARSE_EF_SEARCH = 64


def faiss_lib() -> Any:
    """The ``faiss`` module, imported on first use."""
    import faiss  # imported lazily: heavy, and a GPU build may replace the CPU one

    return faiss


def numpy_method(index: Any, name: str) -> Any:
    """The numpy form of an index method, even after ``faiss.contrib.torch_utils`` has been imported.

    That module (imported by pytorch-metric-learning, among others) replaces ``search``, ``range_search``
    and friends on every index class with torch-aware versions that drop the ``params`` argument; it keeps
    the originals as ``<name>_numpy``. Calling those keeps per-query search parameters working whatever
    else the process imported.
    """
    return getattr(index, f"{name}_numpy", None) or getattr(index, name)


def layers(index: Any) -> Iterator[Any]:
    """The index and every wrapper below it (id map, pre-transform, refine's base), outermost first, downcast."""
    faiss = faiss_lib()
    index = faiss.downcast_index(index)
    while True:
        yield index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return


def unwrap(index: Any) -> Any:
    """The searching index under id maps, pre-transforms (OPQ, PCA) and refine wrappers, as its concrete type.

    For a refine index this is the base index (IVF or HNSW) whose nprobe / efSearch ``tune`` sets.
    """
    *_, inner = layers(index)
    return inner


def refine_of(index: Any) -> Any:
    """The ``IndexRefine`` (or ``IndexRefineFlat``) inside ``index``, or None."""
    faiss = faiss_lib()
    return next((layer for layer in layers(index) if isinstance(layer, faiss.IndexRefine)), None)


def ivf_of(index: Any) -> Any:
    """The IVF index searching inside ``index`` (under any wrapper, or as a refine's base), or None."""
    inner = unwrap(index)
    return inner if isinstance(inner, faiss_lib().IndexIVF) else None


def hnsw_of(index: Any) -> Any:
    """The HNSW graph (``faiss.HNSW``) searching inside ``index``, or None."""
    inner = unwrap(index)
    return inner.hnsw if isinstance(inner, faiss_lib().IndexHNSW) else None


def has_pretransform(index: Any) -> bool:
    """Whether an OPQ / PCA pre-transform rotates or reduces vectors before the searching index sees them."""
    faiss = faiss_lib()
    return any(isinstance(layer, faiss.IndexPreTransform) for layer in layers(index))


def is_fast_scan(index: Any) -> bool:
    """4-bit PQ fast-scan ("PQ64x4fs"): packed codes scanned with SIMD lookups; CPU only."""
    faiss = faiss_lib()
    return isinstance(unwrap(index), (faiss.IndexIVFFastScan, faiss.IndexFastScan))


def takes_ids_natively(index: Any) -> bool:
    """IVF indexes, bare or behind a pre-transform, store ids in their lists; IndexRefine etc. do not."""
    faiss = faiss_lib()
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


def widen_coarse_search(index: Any) -> None:
    """Search an IVF index's HNSW coarse quantiser at least ``COARSE_EF_SEARCH`` wide (see there why)."""
    faiss = faiss_lib()
    coarse = ivf_of(index)
    quantizer = None if coarse is None else faiss.downcast_index(coarse.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW) and quantizer.hnsw.efSearch < COARSE_EF_SEARCH:
        quantizer.hnsw.efSearch = COARSE_EF_SEARCH
