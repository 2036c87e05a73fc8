"""What every vector backend accepts from its callers: vectors and ids, refused with a clear message.

The ``VectorIndex`` contract (unit float32 vectors under unique int64 ids, never ``NO_ID``) is the same for
every backend, so its checks live here once and each backend composes the ones it needs. Checks that belong to
one backend stay with it: FAISS's label-filter refusal (``faiss_filter``), Qdrant's unsigned point ids and
non-zero queries (``qdrant_index``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from indexing.vector_index import NO_ID

__all__ = [
    "NORM_TOLERANCE",
    "as_ids",
    "as_new_ids",
    "check_new_ids",
    "check_not_reserved",
    "check_unique",
    "check_unit_norm",
    "check_vectors",
    "refuse_stored",
]

#: How far a vector's L2 norm may be from 1 before ``add`` refuses it.
NORM_TOLERANCE = 1e-3


def check_vectors(vectors: Any, dim: int, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``(N, dim)`` array.

    Raises:
        ValueError: another shape, a non-floating dtype, or NaN / infinite values.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}), got {vectors.shape}")
    if vectors.size and not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {vectors.dtype}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return vectors


def check_unit_norm(vectors: np.ndarray) -> None:
    """Refuse vectors that are not L2-normalised: the index ranks by inner product, which is cosine only then."""
    norms = np.linalg.norm(vectors, axis=1)
    if vectors.shape[0] and np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        worst = float(norms[np.abs(norms - 1.0).argmax()])
        raise ValueError(
            f"vectors must be L2-normalised (the index ranks by inner product = cosine); found a norm of {worst:.4f}"
        )


def as_ids(ids: Any, what: str) -> np.ndarray:
    """``ids`` as a 1-D int64 array (an empty list is fine).

    Raises:
        ValueError: not 1-D, or not integers.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of integer ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def as_new_ids(ids: Any, count: int) -> np.ndarray:
    """The ids of ``count`` vectors about to be added, as a C-contiguous int64 ``(count,)`` array.

    Raises:
        ValueError: another shape, or not integers.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != count:
        raise ValueError(f"ids must have shape ({count},) to match the vectors, got {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_not_reserved(ids: np.ndarray) -> None:
    """Refuse ``NO_ID``: it marks an empty result slot, so an item stored under it could never be returned."""
    if (ids == NO_ID).any():
        raise ValueError(f"id {NO_ID} is reserved by FAISS for empty result slots and cannot be an item id")


def check_unique(ids: np.ndarray) -> np.ndarray:
    """The sorted distinct ``ids``; two vectors under one id would leave one of them unreachable.

    Raises:
        ValueError: an id appears more than once.
    """
    unique = np.unique(ids)
    if unique.size != ids.size:
        raise ValueError("ids passed to add() must be unique; the same id appears more than once")
    return unique


def refuse_stored(present: np.ndarray) -> None:
    """Refuse new ids that the index already stores (``present``: those of them it does); names up to five.

    Raises:
        ValueError: ``present`` is not empty.
    """
    if present.size:
        raise ValueError(f"ids already in the index: {np.sort(present)[:5].tolist()}")


def check_new_ids(ids: Any, count: int, stored: np.ndarray | None) -> np.ndarray:
    """The ids of ``count`` vectors about to be added, as int64: unique, not ``NO_ID``, none of ``stored``.

    For a backend that holds every stored id at hand; one that must ask a server composes ``as_new_ids``,
    ``check_unique`` and ``refuse_stored`` around its own lookup.

    Raises:
        ValueError: wrong shape or dtype, ``NO_ID``, duplicates, or ids already stored.
    """
    ids = as_new_ids(ids, count)
    check_not_reserved(ids)
    unique = check_unique(ids)
    if stored is not None and stored.size:
        refuse_stored(unique[np.isin(unique, stored)])
    return ids
