"""Checks that an index file holds what an index of ours must hold, for files that no checksum vouches for.

A manifest written before checksums existed cannot say whether ``index.faiss`` still holds the bytes that
were written, and FAISS reads a file with a flipped byte in its vectors without complaint: every search
then ranks a vector of norm 1e35 first (measured: score 8.9e35, or 1.39 for a flip in a lower byte). What
can be checked without a checksum is checked here: the vectors we store are finite unit vectors, the HNSW
graph only links stored nodes, and an inner product of unit vectors cannot exceed 1. ``open_index_dir``
runs the sampled check on such indexes, ``retrieval index verify`` the full one, and every search the
score bound (a few comparisons per hit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from indexing.errors import IndexFormatError
from indexing.faiss_index import FaissIndex
from indexing.vector_index import VectorIndex

__all__ = ["NORM_TOLERANCE", "SAMPLE_SIZE", "check_graph", "check_scores", "check_vectors", "stores_exact_vectors"]

#: How far a stored vector's norm may be from 1 (the tolerance ``FaissIndex.add`` accepts, with float32 slack).
NORM_TOLERANCE = 2e-3
#: Vectors reconstructed by the sampled check on open: spread over the whole file, a few milliseconds.
SAMPLE_SIZE = 64


def stores_exact_vectors(index: VectorIndex) -> bool:
    """True when a FAISS index keeps the float32 vectors themselves (Flat, HNSW-Flat, IVF-Flat), not codes.

    Only then are reconstructed vectors exactly unit length and scores bounded by 1; PQ and scalar
    quantisers decode approximations whose norms (and scores) may be a little off. Other backends keep
    their own storage (a server may quantise), so their scores get the looser bound.
    """
    if not isinstance(index, FaissIndex):
        return False
    import faiss

    inner = _unwrapped(index)
    if isinstance(inner, faiss.IndexRefine):  # re-ranked from its refine store: exact when that is a flat store
        inner = faiss.downcast_index(inner.refine_index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _unwrapped(index: FaissIndex) -> Any:
    """The FAISS index under the id map (or the IVF index itself), as its concrete class."""
    import faiss

    inner = index.faiss_index
    return faiss.downcast_index(inner.index if isinstance(inner, faiss.IndexIDMap) else inner)


def check_vectors(index: FaissIndex, where: str, *, sample: int | None = SAMPLE_SIZE) -> int:
    """Reconstruct stored vectors and refuse non-finite ones, or non-unit ones where vectors are stored exactly.

    Args:
        index: the loaded index.
        where: the file named in the error (``"index directory X: index.faiss"``).
        sample: vectors to check, spread evenly over the stored order (first and last included), or
            ``None`` for every vector (``retrieval index verify``).

    Returns:
        How many vectors were checked.

    Raises:
        IndexFormatError: a vector that cannot be reconstructed, is not finite, or is not unit length.
    """
    ids = index.ids()
    if ids.size == 0:
        return 0
    exact = stores_exact_vectors(index)
    if sample is not None and ids.size > sample:
        positions = np.unique(np.linspace(0, ids.size - 1, sample).round().astype(np.int64))
        try:
            vectors = index.reconstruct(ids[positions])
        except (RuntimeError, ValueError) as exc:
            raise IndexFormatError(f"{where} is corrupt: its vectors cannot be read back ({exc})") from None
        _check_chunk(ids[positions], vectors, exact, where)
        return int(positions.size)

    def consume(chunk_ids: np.ndarray, chunk: np.ndarray) -> None:
        _check_chunk(chunk_ids, chunk, exact, where)

    try:
        index.scan(consume)
    except IndexFormatError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise IndexFormatError(f"{where} is corrupt: its vectors cannot be read back ({exc})") from None
    return int(ids.size)


def _check_chunk(ids: np.ndarray, vectors: np.ndarray, exact: bool, where: str) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = int(ids[np.argmin(finite)])
        raise IndexFormatError(f"{where} is corrupt: the vector of id {bad} holds NaN or infinite values")
    if exact:
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            i = int(np.argmax(off))
            raise IndexFormatError(
                f"{where} is corrupt: the vector of id {int(ids[i])} has norm {norms[i]:.4g}, "
                "but every stored vector is unit length"
            )


def check_graph(index: FaissIndex, where: str) -> None:
    """Refuse an HNSW graph that links to nodes that do not exist (FAISS would read out of bounds).

    The graph may be the index itself (HNSW32), the base of a refine index (HNSW32_SQ8,RFlat) or the coarse
    quantiser of an inverted file (IVF4096_HNSW32,...): each is checked.
    """
    import faiss

    inner = _unwrapped(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.downcast_index(inner.quantizer)
    if isinstance(inner, faiss.IndexHNSW):
        _check_hnsw(inner, where)


def _check_hnsw(inner: Any, where: str) -> None:
    import faiss

    hnsw: Any = inner.hnsw
    neighbors = faiss.vector_to_array(hnsw.neighbors)
    levels = faiss.vector_to_array(hnsw.levels)
    ntotal = int(inner.ntotal)
    if levels.size != ntotal or (neighbors.size and (neighbors.min() < -1 or neighbors.max() >= ntotal)):
        raise IndexFormatError(f"{where} is corrupt: its HNSW graph links to nodes outside the {ntotal} stored")
    if ntotal and not (-1 <= int(hnsw.entry_point) < ntotal):
        raise IndexFormatError(f"{where} is corrupt: its HNSW entry point {hnsw.entry_point} is not a stored node")


def check_scores(scores: np.ndarray, queries: np.ndarray, exact: bool, where: str) -> None:
    """Refuse search results that unit vectors cannot produce: NaN/inf, or (exact storage) a score above 1.

    ``scores`` is ``(Q, k)`` (or flat, with one bound for all queries); empty slots hold ``-inf`` or
    ``-3.4e38`` and pass. The bound is each query's own norm (plus float32 slack), so unnormalised
    queries are not mistaken for a corrupt index.
    """
    if scores.size == 0:
        return
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise IndexFormatError(f"{where} is corrupt: a search returned NaN or infinite scores; rebuild the index")
    if not exact:
        return
    norms = np.linalg.norm(np.asarray(queries, dtype=np.float64), axis=1)
    bound = (norms.max() if scores.ndim == 1 else norms[:, None]) * (1 + NORM_TOLERANCE) + 1e-6
    if (scores > bound).any():
        raise IndexFormatError(
            f"{where} is corrupt: a search scored {float(scores.max()):.4g}, above the 1.0 that unit vectors allow; "
            "run `retrieval index verify` on it or rebuild the index"
        )
