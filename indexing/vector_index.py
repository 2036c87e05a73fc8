"""The vector index as an interface: what an index directory needs from any backend, FAISS or a server.

An index directory (``indexing.index_dir``) is manifest + metadata + vectors. Where the vectors live and how
they are searched is the backend's business: ``faiss`` (the embedded default, ``indexing.faiss_index``) keeps
them in a file inside the directory; ``qdrant`` (``indexing.qdrant_index``) keeps them in a Qdrant collection
the manifest names. Everything above this seam (building, ``index add``, calibration, search at a granularity,
the HTTP API) talks to ``VectorIndex`` only, so a third backend is one class registered in ``VECTOR_BACKENDS``.

The contract every backend keeps, because the layers above rely on it:

- vectors are L2-normalised float32 and the score is their inner product (= cosine), best first;
- items carry the engine's own int64 ids (never ``NO_ID``), so metadata, shards and incremental adds never
  depend on the backend's insertion order;
- an empty result slot is ``(score, NO_ID)`` and is dropped by the caller;
- ``where`` restricts a search to items whose label at a level is one of some values. A backend that stores
  labels (``stores_labels``) evaluates it itself; for the others the index directory resolves it to ids from
  its metadata and passes ``allowed_ids``. Either way the hits are the best among the allowed items.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from retrieval.registry import Registry

if TYPE_CHECKING:
    from indexing.manifest import Manifest

__all__ = [
    "DEFAULT_BACKEND",
    "NO_ID",
    "VECTOR_BACKENDS",
    "LabelFilter",
    "RangeSearchResult",
    "SearchParams",
    "VectorIndex",
    "backend_class",
    "check_k",
]

#: The id an empty result slot holds; it can therefore never be an item id.
NO_ID = -1
#: The backend of manifests that name none (every directory written before backends existed).
DEFAULT_BACKEND = "faiss"

#: Every vector backend by name; ``backend_class`` imports the built-in ones on first use.
VECTOR_BACKENDS: Registry[type[VectorIndex]] = Registry("vector index backend")
#: Modules that register the built-in backends (imported lazily: FAISS and qdrant-client are heavy or optional).
_BUILTIN_BACKENDS = {"faiss": "indexing.faiss_index", "qdrant": "indexing.qdrant_index"}


def backend_class(name: str) -> type[VectorIndex]:
    """The ``VectorIndex`` class registered as ``name``, importing a built-in backend's module first.

    Raises:
        UnknownNameError: no such backend (the message lists the valid names).
    """
    module = _BUILTIN_BACKENDS.get(name)
    if module is not None and name not in VECTOR_BACKENDS:
        importlib.import_module(module)
    if name not in VECTOR_BACKENDS:
        for other in _BUILTIN_BACKENDS.values():  # so the error lists every backend there is
            importlib.import_module(other)
    return VECTOR_BACKENDS.get(name)


@dataclass(frozen=True)
class SearchParams:
    """Search-time parameters; None leaves the index's stored default.

    FAISS uses all three; a graph-based server backend (Qdrant) reads ``ef_search`` as its HNSW ``ef``.

    Attributes:
        nprobe: inverted lists visited per query (IVF types); more is slower and more exact.
        ef_search: candidate-list size of the graph search (HNSW types, FAISS's ``efSearch``).
        k_factor: re-ranking depth of refine indexes (``...,RFlat``, ``...,Refine(SQ8)``): the base index
            proposes ``k * k_factor`` candidates that the refine store re-scores; more is slower and more exact.
    """

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "k_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """The set parameters under FAISS's names (``nprobe``, ``efSearch``, ``k_factor``), for the manifest.

        Unset parameters are left out, so manifests written before ``k_factor`` existed read back unchanged.
        """
        out = {"nprobe": self.nprobe, "efSearch": self.ef_search, "k_factor": self.k_factor}
        return {key: int(value) for key, value in out.items() if value is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> SearchParams:
        """Inverse of ``to_dict``; accepts ``efSearch`` or ``ef_search``, and manifests without ``k_factor``."""
        unknown = set(values) - {"nprobe", "efSearch", "ef_search", "k_factor"}
        if unknown:
            raise ValueError(f"unknown search parameters {sorted(unknown)}; valid: nprobe, efSearch, k_factor")
        return cls(
            nprobe=values.get("nprobe"),
            ef_search=values.get("efSearch", values.get("ef_search")),
            k_factor=values.get("k_factor"),
        )


@dataclass(frozen=True)
class RangeSearchResult:
    """All hits scoring strictly above a similarity threshold, per query, best first.

    Hits of query ``i`` are ``scores[lims[i]:lims[i+1]]`` and ``ids[lims[i]:lims[i+1]]`` (FAISS's layout).

    Attributes:
        lims: ``(Q + 1,)`` int64 offsets.
        scores: float32 similarities, descending within each query.
        ids: int64 item ids.
        fallback: True when the index has no native range search and a k-NN search with a growing
            k, filtered at the threshold, was used instead (approximate indexes may then miss hits
            their k-NN search misses).
    """

    lims: np.ndarray
    scores: np.ndarray
    ids: np.ndarray
    fallback: bool

    def __post_init__(self) -> None:
        if self.lims.ndim != 1 or self.lims.size < 1 or self.lims[0] != 0 or np.any(np.diff(self.lims) < 0):
            raise ValueError("lims must be a non-decreasing (Q + 1,) array starting at 0")
        if self.scores.shape != self.ids.shape or self.scores.shape != (int(self.lims[-1]),):
            raise ValueError(f"scores {self.scores.shape} and ids {self.ids.shape} must both have lims[-1] entries")

    def __len__(self) -> int:
        return self.lims.size - 1

    def hits(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of query ``i``, best first."""
        lo, hi = int(self.lims[i]), int(self.lims[i + 1])
        return self.scores[lo:hi], self.ids[lo:hi]

    @classmethod
    def from_hits(cls, hits: Sequence[tuple[np.ndarray, np.ndarray]], *, fallback: bool) -> RangeSearchResult:
        """Pack per-query ``(scores, ids)`` (each best first) into the flat layout."""
        lims = np.zeros(len(hits) + 1, np.int64)
        lims[1:] = np.cumsum([len(scores) for scores, _ in hits])
        scores = np.concatenate([s for s, _ in hits]) if hits else np.zeros(0, np.float32)
        ids = np.concatenate([i for _, i in hits]) if hits else np.zeros(0, np.int64)
        return cls(lims, scores.astype(np.float32), ids.astype(np.int64), fallback=fallback)


@dataclass(frozen=True)
class LabelFilter:
    """Restrict a search to items whose label at ``level`` is one of ``values`` (e.g. coarse == "shoes").

    Attributes:
        level: a label level of the index (``Manifest.levels``).
        values: accepted label values; an item matches when its label at ``level`` equals one of them.
    """

    level: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.level:
            raise ValueError("a label filter needs a level")
        if not self.values:
            raise ValueError(f"a label filter on {self.level!r} needs at least one value")

    @classmethod
    def parse(cls, text: str) -> LabelFilter:
        """``"LEVEL=VALUE"`` or ``"LEVEL=V1,V2"`` (the CLI's ``--where`` and the HTTP API's ``where``).

        Raises:
            ValueError: no ``=``, or an empty level or value list.
        """
        level, sep, values = text.partition("=")
        if not sep:
            raise ValueError(f"a filter is LEVEL=VALUE (e.g. coarse=shoes), got {text!r}")
        parsed = tuple(value.strip() for value in values.split(",") if value.strip())
        return cls(level.strip(), parsed)

    def __str__(self) -> str:
        return f"{self.level}={','.join(self.values)}"


def check_k(k: Any) -> int:
    """``k`` as an int, refusing booleans, non-integers and values below 1 (every backend's ``search`` does)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


class VectorIndex(ABC):
    """Unit vectors under int64 ids, searchable by inner product; one implementation per backend.

    Subclasses set ``backend`` (the name the manifest records) and register themselves with
    ``VECTOR_BACKENDS.register(backend)``. A new index is made by ``create``, filled with ``train`` (a
    no-op where nothing is learned) and ``add``, written into an index directory by ``write_to`` and opened
    again by ``open``.
    """

    #: The name recorded in the manifest's ``backend`` field.
    backend: ClassVar[str]
    #: Whether the backend keeps each item's labels and evaluates ``LabelFilter`` itself.
    stores_labels: ClassVar[bool] = False
    #: Whether ``add`` and ``remove`` change shared state outside the index directory (a server
    #: collection) rather than an in-memory copy that only ``write_to`` writes.
    writes_in_place: ClassVar[bool] = False
    #: The files ``write_to`` writes into the index directory (checksummed by the manifest when there is one).
    files: ClassVar[tuple[str, ...]] = ()

    #: What kind of index this is, recorded as the manifest's ``factory`` (FAISS: its factory string).
    factory: str

    @classmethod
    @abstractmethod
    def create(cls, dim: int, factory: str, options: Mapping[str, Any]) -> VectorIndex:
        """A new, empty index of ``dim``-d vectors.

        Args:
            dim: vector dimension.
            factory: the index type where the backend has a choice (FAISS's factory string), already
                resolved from "auto"; a backend without one accepts its own ``factory`` name only.
            options: backend options from the command line (Qdrant: ``url``, ``collection``).

        Raises:
            ConfigError: a factory or option the backend does not take.
        """

    # ------------------------------------------------------------------ size and ids

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the stored vectors."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of stored vectors."""

    def __len__(self) -> int:
        return self.ntotal

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Every stored id, int64, in an order of the backend's choosing."""

    # ------------------------------------------------------------------ building

    @property
    def is_trained(self) -> bool:
        """False while an index type that learns from sample vectors (IVF, PQ) has not seen them."""
        return True

    def train(self, vectors: np.ndarray, *, seed: int = 0) -> None:  # noqa: B027 - optional step, no-op by default
        """Learn from a sample of the gallery before ``add``; nothing to learn by default."""

    @abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray, labels: Sequence[Mapping[str, str]] | None = None) -> None:
        """Store L2-normalised ``(N, dim)`` vectors under unique new int64 ``ids``.

        Args:
            vectors: unit vectors, one row per id.
            ids: ``(N,)`` ids not already stored, never ``NO_ID``.
            labels: each item's labels by level, for backends that evaluate ``LabelFilter`` (``stores_labels``);
                ignored by the others (the index directory's metadata holds them).

        Raises:
            ValueError: wrong shapes, non-unit vectors, duplicate or reserved ids.
        """

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Delete the given ids (absent ones are ignored); returns how many were removed."""

    # ------------------------------------------------------------------ search

    @property
    def default_params(self) -> SearchParams:
        """The search parameters ``search`` uses unless given others."""
        return SearchParams()

    def set_default_params(self, params: SearchParams) -> None:
        """Store ``params`` as the defaults; a backend without such knobs refuses any that are set.

        Raises:
            ValueError: a parameter that does not apply to this backend.
        """
        if params.to_dict():
            raise ValueError(f"the {self.backend} backend takes no search parameters, got {params.to_dict()}")

    @abstractmethod
    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        *,
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best stored vectors per query: ``(scores float32 (Q, k'), ids int64 (Q, k'))``, best first.

        ``k' = min(k, ntotal)``; slots without a hit hold ``NO_ID``. ``where`` (backends with
        ``stores_labels``) or ``allowed_ids`` (any backend) restrict the candidates.

        Raises:
            ValueError: bad queries or ``k``; ``where`` on a backend that does not store labels.
        """

    @abstractmethod
    def range_search(
        self,
        queries: np.ndarray,
        threshold: float,
        params: SearchParams | None = None,
        *,
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> RangeSearchResult:
        """Every stored vector scoring strictly above ``threshold`` per query, best first."""

    def tune(self, queries: np.ndarray, target_recall: float = 0.95, *, seed: int = 0) -> Any:
        """Choose search parameters reaching ``target_recall`` on ``queries``; None where there is nothing to tune."""
        return None

    # ------------------------------------------------------------------ persistence

    @abstractmethod
    def write_to(self, directory: Path) -> dict[str, Any]:
        """Write what the index directory keeps of this index into ``directory`` (a new, not yet published copy).

        Returns:
            The backend options the manifest records to open it again (``Manifest.backend_options``).
        """

    def publish(self, previous: Manifest | None) -> None:  # noqa: B027 - only server backends need it
        """Called once the directory written by ``write_to`` has replaced ``previous`` (None for a new directory).

        A backend whose data lives outside the directory makes it the live one here (Qdrant: the collection
        alias moves to the new collection, the previous collection is dropped).
        """

    def discard(self) -> None:  # noqa: B027 - only server backends need it
        """Called when the directory written by ``write_to`` was not published (the write failed): drop what it made."""

    @classmethod
    @abstractmethod
    def open(cls, directory: Path, manifest: Manifest) -> VectorIndex:
        """Open the index of the directory at ``directory`` described by ``manifest``.

        Raises:
            ValueError, OSError: the stored index is missing or unreadable (reported as ``IndexFormatError``).
        """

    def describe(self) -> dict[str, Any]:
        """Backend state for ``retrieval index info`` (JSON-serialisable)."""
        return {"backend": self.backend, "ntotal": self.ntotal}

    def close(self) -> None:  # noqa: B027 - only backends holding connections need it
        """Release connections or locks held by the index."""
