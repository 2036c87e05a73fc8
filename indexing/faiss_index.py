"""A small wrapper around a FAISS index: inner product on unit vectors, the engine's own int64 ids.

Encoders emit L2-normalised embeddings, so inner product equals cosine similarity and the
index ranks exactly as training losses and evaluation metrics do. Items keep the ids the
engine gives them (``IndexIDMap2``), so the metadata store, shards and incremental adds
never depend on FAISS's internal insertion order. Any ``faiss.index_factory`` string can be
wrapped ("Flat" is exact search; IVF/HNSW strings need ``train`` first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import ConfigError

__all__ = ["NO_ID", "FaissIndex"]

#: The id FAISS returns for an empty result slot; it can therefore never be an item id.
NO_ID = -1
#: How far a vector's L2 norm may be from 1 before ``add`` refuses it.
_NORM_TOLERANCE = 1e-3


def _faiss() -> Any:
    import faiss  # imported lazily: heavy, and a GPU build may replace the CPU one

    return faiss


class FaissIndex:
    """An ``IndexIDMap2`` around ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``.

    Args:
        dim: embedding dimension.
        factory: ``faiss.index_factory`` description of the underlying index ("Flat" = exact).

    Raises:
        ValueError: a non-positive dimension or a factory string FAISS does not understand.
    """

    def __init__(self, dim: int, factory: str = "Flat") -> None:
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        faiss = _faiss()
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid FAISS index factory string {factory!r}: {exc}") from exc
        self._index = faiss.IndexIDMap2(inner)
        self.factory = factory

    @classmethod
    def _wrap(cls, index: Any, factory: str) -> FaissIndex:
        obj = cls.__new__(cls)
        obj._index = index
        obj.factory = factory
        return obj

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False for index types (IVF, PQ) that must see sample vectors before ``add``."""
        return bool(self._index.is_trained)

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS object, for tuning search parameters (``nprobe``, ``efSearch``)."""
        return self._index

    def ids(self) -> np.ndarray:
        """All stored ids, int64, in insertion order."""
        return _faiss().vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def reconstruct_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored ``(ids, vectors)`` in insertion order; exact for Flat, approximate for compressed indexes."""
        vectors = self._index.index.reconstruct_n(0, self.ntotal)
        return self.ids(), np.asarray(vectors, dtype=np.float32)

    def train(self, vectors: np.ndarray) -> None:
        """Train the underlying index on sample vectors; a no-op for indexes that need none ("Flat")."""
        if self.is_trained:
            return
        vectors = self._check_vectors(vectors, "training vectors")
        try:
            self._index.train(vectors)
        except RuntimeError as exc:  # e.g. fewer training vectors than IVF centroids
            raise ConfigError(f"index {self.factory!r} cannot be trained on {len(vectors)} vectors: {exc}") from exc

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add L2-normalised vectors under the given int64 ids.

        Args:
            vectors: ``(N, dim)`` floating array of unit-norm vectors (converted to float32).
            ids: ``(N,)`` integer ids, unique, not already stored, never ``-1`` (FAISS's "no result").

        Raises:
            ValueError: wrong shape, dtype or dimension, non-finite or non-unit vectors, bad ids,
                or an index that needs training first.
        """
        vectors = self._check_vectors(vectors, "vectors")
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != vectors.shape[0]:
            raise ValueError(f"ids must have shape ({vectors.shape[0]},) to match the vectors, got {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if (ids == NO_ID).any():
            raise ValueError(f"id {NO_ID} is reserved by FAISS for empty result slots and cannot be an item id")
        unique = np.unique(ids)
        if unique.size != ids.size:
            raise ValueError("ids passed to add() must be unique; the same id appears more than once")
        if self.ntotal and np.isin(unique, self.ids()).any():
            clash = unique[np.isin(unique, self.ids())][:5].tolist()
            raise ValueError(f"ids already in the index: {clash}")
        norms = np.linalg.norm(vectors, axis=1)
        if vectors.shape[0] and np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
            worst = float(norms[np.abs(norms - 1.0).argmax()])
            raise ValueError(
                "vectors must be L2-normalised (the index ranks by inner product = cosine); "
                f"found a norm of {worst:.4f}"
            )
        if not self.is_trained:
            raise ValueError(f"the {self.factory!r} index must be trained (FaissIndex.train) before adding vectors")
        if vectors.shape[0]:
            self._index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored vectors for each query.

        ``k`` is clipped to the number of stored vectors. Approximate index types may still
        return fewer than ``k`` neighbours for a query; those slots hold id ``NO_ID`` (-1) and
        score ``-inf``-like values and must be dropped by the caller.

        Args:
            queries: ``(Q, dim)`` floating array (converted to float32).
            k: number of neighbours wanted, at least 1.

        Returns:
            ``(scores float32 (Q, k'), ids int64 (Q, k'))`` best first, with ``k' = min(k, ntotal)``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._check_vectors(queries, "queries")
        k = min(int(k), self.ntotal)
        if k == 0 or queries.shape[0] == 0:
            return np.zeros((queries.shape[0], k), np.float32), np.full((queries.shape[0], k), NO_ID, np.int64)
        scores, ids = self._index.search(queries, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        """Write the index (vectors and id map) to one file."""
        _faiss().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: str | Path, factory: str = "Flat") -> FaissIndex:
        """Read an index written by ``save``.

        Args:
            path: the index file.
            factory: the factory string it was built with (the file does not record it; the manifest does).

        Raises:
            ValueError: the file is unreadable, not an id-mapped index, or not inner-product.
        """
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read FAISS index {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path} holds a {type(index).__name__}, expected an id-mapped index (IndexIDMap2)")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} is not an inner-product index (metric type {index.metric_type})")
        return cls._wrap(index, factory)

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (N, {self.dim}), got {vectors.shape}")
        if vectors.size and not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(f"{what} must be floating point, got dtype {vectors.dtype}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return vectors

    def __repr__(self) -> str:
        return f"FaissIndex(dim={self.dim}, factory={self.factory!r}, ntotal={self.ntotal})"
