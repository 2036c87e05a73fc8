"""Qdrant as a vector backend: the gallery's vectors in a Qdrant collection, for galleries beyond one machine.

Where the vectors live is a *location* string, recorded in the manifest as ``url``: a server
(``http(s)://HOST:PORT``), qdrant-client's in-process store (``:memory:``) or its local mode in a directory;
``qdrant_connection`` parses it and holds the one client per location that every index there shares.

Every write makes a new *physical* collection ``<collection>-<8 hex>``; the *alias* ``<collection>`` names the
live one. ``publish`` moves the alias in one atomic ``update_collection_aliases`` call and then drops the
previous directory's physical collection; ``discard`` drops an unpublished one. An index directory reads the
physical collection its manifest names, never the alias, so a directory always searches the vectors it was
written with, while other clients of the server may follow the alias.

Scores keep the backend contract (inner product with unit gallery vectors): the collection uses cosine
distance, which Qdrant computes on normalised vectors, and ``search`` multiplies by each query's norm, so a
query that is not unit-length ranks and scores exactly as it does against FAISS.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from indexing.qdrant_connection import (
    QdrantConnection,
    QdrantLocation,
    acquire_connection,
    import_qdrant,
    release_connection,
)
from indexing.vector_checks import as_new_ids, check_unique, check_unit_norm, check_vectors, refuse_stored
from indexing.vector_index import (
    NO_ID,
    VECTOR_BACKENDS,
    LabelFilter,
    RangeSearchResult,
    SearchParams,
    VectorIndex,
    check_k,
)

if TYPE_CHECKING:
    from indexing.manifest import Manifest

__all__ = ["QDRANT_FACTORY", "QdrantIndex"]

logger = logging.getLogger(__name__)

#: The manifest's ``factory`` of every Qdrant index: Qdrant chooses and tunes its own structure (HNSW).
QDRANT_FACTORY = "qdrant"
#: Points per upsert request: large enough to amortise a round trip, small enough for the server's request limit.
_UPSERT_BATCH = 1024
#: Ids per retrieve / delete request and per page when scrolling through every id.
_ID_BATCH = 10_000
#: Queries per ``query_batch_points`` request.
_QUERY_BATCH = 256
#: ``search`` counts the collection before asking for more than this many hits (a server allocates per limit).
_COUNT_FIRST_ABOVE = 10_000
#: First limit of ``range_search``; doubled until fewer hits than the limit come back.
_RANGE_FIRST_LIMIT = 64
#: Score of an empty result slot: FAISS's (-FLT_MAX), finite so results stay JSON-serialisable.
_EMPTY_SCORE = float(np.finfo(np.float32).min)
#: ``range_search`` asks Qdrant for hits from slightly below the threshold and keeps those strictly above it,
#: so a hit on the threshold's edge is never lost to rounding between Qdrant's arithmetic and ours.
_RANGE_SLACK = 1e-6
#: A collection name: what Qdrant accepts in a URL path and a directory name, and room for the 9-character suffix.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
#: The keys of ``Manifest.backend_options`` this backend reads.
_OPTION_KEYS = frozenset({"url", "collection", "physical", "exact"})
#: The options ``create`` takes (the physical collection is made there).
_CREATE_KEYS = frozenset({"url", "collection", "exact"})


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"{what} must be 1-200 characters of letters, digits, '_', '-' or '.' (not starting with - or .), "
            f"got {name!r}"
        )
    return name


def _chunks(values: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@VECTOR_BACKENDS.register("qdrant")
class QdrantIndex(VectorIndex):
    """Unit vectors in a Qdrant collection under the engine's int64 ids, with each item's labels as payload.

    Build one with ``create`` (a new physical collection) and open one with ``open`` / ``connect`` (an existing
    physical collection); the constructor only wraps what those two found.

    Args:
        connection: the shared client of the location (``acquire_connection``; released by ``close``).
        collection: the alias name.
        physical: the physical collection this index reads and writes.
        dim: dimension of the stored vectors.
        exact: ask the server for exact (full-scan) search instead of HNSW; local mode is always exact.
    """

    backend: ClassVar[str] = "qdrant"
    stores_labels: ClassVar[bool] = True
    writes_in_place: ClassVar[bool] = True
    files: ClassVar[tuple[str, ...]] = ()
    factory: str = QDRANT_FACTORY

    def __init__(self, connection: QdrantConnection, collection: str, physical: str, dim: int, *, exact: bool) -> None:
        self._connection: QdrantConnection | None = connection
        self._location = connection.location
        self._collection = collection
        self._physical = physical
        self._dim = int(dim)
        self._exact = bool(exact)
        self._ef_search: int | None = None
        self._indexed_levels: set[str] = set()
        self._created = False  # made by ``create``: only then may ``discard`` drop the collection

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, dim: int, factory: str, options: Mapping[str, Any]) -> QdrantIndex:
        """Make a new, empty physical collection ``<collection>-<8 hex>`` (cosine distance) at ``options["url"]``.

        Args:
            dim: embedding dimension.
            factory: "auto" or "qdrant": Qdrant chooses its own structure (HNSW on a server, a full scan locally).
            options: ``url`` (``http(s)://HOST:PORT``, ``:memory:`` or a directory), ``collection`` (the alias
                ``publish`` points at the new collection) and optionally ``exact`` (search a server by full scan
                instead of HNSW; recorded in the backend options).

        Raises:
            ConfigError: another factory, missing or unknown options, a bad dimension, location or collection
                name, or a real collection already named ``collection``.
            QdrantConnectionError: the server cannot be reached.
        """
        from retrieval.config import ConfigError

        if factory not in ("auto", QDRANT_FACTORY):
            raise ConfigError(
                f"the qdrant backend chooses its own index structure; leave --factory at auto, got {factory!r}"
            )
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"index dimension must be a positive integer, got {dim!r}")
        if not isinstance(options, Mapping) or not {"url", "collection"} <= set(options) or set(options) - _CREATE_KEYS:
            given = sorted(options) if isinstance(options, Mapping) else type(options).__name__
            raise ConfigError(f"the qdrant backend takes options url, collection and optionally exact; got {given}")
        exact = options.get("exact", False)
        try:
            location = QdrantLocation.parse(options["url"])
            collection = _check_name(options["collection"], "a Qdrant collection name")
            if not isinstance(exact, bool):
                raise ValueError(f"the qdrant option exact must be true or false, got {exact!r}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _, models = import_qdrant()
        connection = acquire_connection(location)
        try:
            _check_alias_free(connection, collection)
            physical = f"{collection}-{secrets.token_hex(4)}"
            while connection.call("collection_exists", physical):
                physical = f"{collection}-{secrets.token_hex(4)}"
            vectors = models.VectorParams(size=int(dim), distance=models.Distance.COSINE)
            connection.call("create_collection", collection_name=physical, vectors_config=vectors)
        except BaseException:
            release_connection(connection)
            raise
        logger.info("created Qdrant collection %s at %s (dim %d)", physical, location.url, dim)
        index = cls(connection, collection, physical, int(dim), exact=exact)
        index._created = True
        return index

    @classmethod
    def connect(cls, options: Mapping[str, Any]) -> QdrantIndex:
        """Open the physical collection that backend options (``write_to``'s return value) name.

        Raises:
            ValueError: missing or unknown options, or no such collection at that location.
            QdrantConnectionError: the server cannot be reached.
        """
        if not isinstance(options, Mapping):
            raise ValueError(f"qdrant backend options must be a mapping, got {type(options).__name__}")
        missing = {"url", "collection", "physical"} - set(options)
        unknown = set(options) - _OPTION_KEYS
        if missing or unknown:
            raise ValueError(
                f"qdrant backend options need url, collection and physical (and optionally exact); "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        location = QdrantLocation.parse(options["url"])
        if location.kind == "path" and not Path(location.url).is_dir():  # local mode would create it, empty
            raise ValueError(f"the local Qdrant store {location.url} does not exist")
        collection = _check_name(options["collection"], "the manifest's Qdrant collection")
        physical = _check_name(options["physical"], "the manifest's Qdrant physical collection")
        exact = options.get("exact", False)
        if not isinstance(exact, bool):
            raise ValueError(f"qdrant backend option exact must be true or false, got {exact!r}")
        connection = acquire_connection(location)
        try:
            if not connection.call("collection_exists", physical):
                raise ValueError(
                    f"Qdrant collection {physical!r} (alias {collection!r}) does not exist at {location.url}; "
                    "it was deleted, or the index was written against another Qdrant"
                )
            info = connection.call("get_collection", physical)
            dim = _vector_size(info, physical)
        except BaseException:
            release_connection(connection)
            raise
        index = cls(connection, collection, physical, dim, exact=exact)
        index._indexed_levels = {key.removeprefix("labels.") for key in (info.payload_schema or {})}
        return index

    @classmethod
    def open(cls, directory: Path, manifest: Manifest) -> QdrantIndex:
        """Open the physical collection ``manifest.backend_options`` names and check its dimension.

        Raises:
            ValueError: no backend options, a missing collection, or a dimension other than the manifest's.
            QdrantConnectionError: the server cannot be reached.
        """
        options = manifest.backend_options
        if not options:
            raise ValueError(f"the manifest of {directory} names no Qdrant collection (backend_options is empty)")
        index = cls.connect(options)
        if index.dim != manifest.dim:
            index.close()
            raise ValueError(
                f"Qdrant collection {index.physical!r} at {index.url} holds {index.dim}-d vectors, "
                f"the manifest of {directory} says {manifest.dim}"
            )
        return index

    # ------------------------------------------------------------------ identity and size

    @property
    def url(self) -> str:
        """The canonical location (no credentials)."""
        return self._location.url

    @property
    def client(self) -> Any:
        """The shared ``QdrantClient`` of the location (administration and tests; it outlives ``close``).

        Raises:
            RuntimeError: the index is closed.
        """
        if self._connection is None:
            raise RuntimeError(f"the Qdrant index on {self._physical!r} is closed")
        return self._connection.client

    @property
    def collection(self) -> str:
        """The alias that names the live collection."""
        return self._collection

    @property
    def physical(self) -> str:
        """The physical collection this index reads and writes."""
        return self._physical

    @property
    def exact(self) -> bool:
        return self._exact

    def alias_target(self) -> str | None:
        """The physical collection the alias names now (None when it names none): the live one for other clients."""
        aliases = self._call("get_aliases").aliases
        return next((alias.collection_name for alias in aliases if alias.alias_name == self._collection), None)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self._call("count", collection_name=self._physical, exact=True).count)

    def ids(self) -> np.ndarray:
        """Every stored id, int64, in Qdrant's scroll order (ascending ids)."""
        parts = [np.zeros(0, np.int64)]
        offset = None
        while True:
            points, offset = self._call(
                "scroll",
                collection_name=self._physical,
                limit=_ID_BATCH,
                offset=offset,
                with_payload=False,
                with_vectors=False,
            )
            parts.append(np.array([point.id for point in points], dtype=np.int64))
            if offset is None:
                return np.concatenate(parts)

    def _stored(self, ids: np.ndarray) -> np.ndarray:
        """Those of the (non-negative) ``ids`` that are stored."""
        found = [np.zeros(0, np.int64)]
        for chunk in _chunks(ids, _ID_BATCH):
            records = self._call(
                "retrieve",
                collection_name=self._physical,
                ids=chunk.tolist(),
                with_payload=False,
                with_vectors=False,
            )
            found.append(np.array([record.id for record in records], dtype=np.int64))
        return np.concatenate(found)

    # ------------------------------------------------------------------ building

    def add(self, vectors: np.ndarray, ids: np.ndarray, labels: Sequence[Mapping[str, str]] | None = None) -> None:
        """Upsert unit vectors as points ``id -> vector`` with payload ``{"labels": {level: value}}``.

        Points are sent in batches of 1,024, each acknowledged before the next (``wait=True``). A failure part way
        leaves the batches already sent in the collection; ``discard`` drops an unpublished collection whole.

        Raises:
            ValueError: wrong shapes, non-finite or non-unit vectors, negative ids (Qdrant ids are unsigned),
                duplicate ids, ids already stored, or labels that are not one mapping of strings per vector.
        """
        vectors = check_vectors(vectors, self._dim, "vectors")
        ids = self._check_new_ids(ids, vectors.shape[0])
        check_unit_norm(vectors)
        payloads = _payloads(labels, vectors.shape[0])
        if not vectors.shape[0]:
            return
        if payloads is not None:
            self._index_levels(sorted({level for payload in payloads for level in payload["labels"]}))
        _, models = import_qdrant()
        for start in range(0, vectors.shape[0], _UPSERT_BATCH):
            stop = start + _UPSERT_BATCH
            batch = models.Batch(
                ids=ids[start:stop].tolist(),
                vectors=vectors[start:stop].tolist(),
                payloads=None if payloads is None else payloads[start:stop],
            )
            self._call("upsert", collection_name=self._physical, points=batch, wait=True)

    def _check_new_ids(self, ids: np.ndarray, count: int) -> np.ndarray:
        """The new ids as int64: non-negative (which also rules out ``NO_ID``), unique, and not stored yet."""
        ids = as_new_ids(ids, count)
        if (ids < 0).any():
            raise ValueError(
                f"Qdrant point ids are unsigned: negative ids cannot be stored (found {ids[ids < 0][:5].tolist()})"
            )
        refuse_stored(self._stored(check_unique(ids)))
        return ids

    def _index_levels(self, levels: Sequence[str]) -> None:
        """A keyword payload index on ``labels.<level>`` for each new level (servers only: local mode has none)."""
        new = [level for level in levels if level not in self._indexed_levels]
        if not new:
            return
        if not self._location.is_local:
            _, models = import_qdrant()
            for level in new:
                self._call(
                    "create_payload_index",
                    collection_name=self._physical,
                    field_name=f"labels.{level}",
                    field_schema=models.PayloadSchemaType.KEYWORD,
                    wait=True,
                )
        self._indexed_levels.update(new)

    def remove(self, ids: np.ndarray) -> int:
        """Delete the given ids (absent and negative ones are ignored); returns how many were removed."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        ids = np.unique(ids.astype(np.int64))
        present = self._stored(ids[ids >= 0])
        if not present.size:
            return 0
        _, models = import_qdrant()
        for chunk in _chunks(present, _ID_BATCH):
            selector = models.PointIdsList(points=chunk.tolist())
            self._call("delete", collection_name=self._physical, points_selector=selector, wait=True)
        return int(present.size)

    # ------------------------------------------------------------------ search

    @property
    def default_params(self) -> SearchParams:
        """``ef_search`` (Qdrant's ``hnsw_ef``) when one was set; the server's own default otherwise."""
        return SearchParams(ef_search=self._ef_search)

    def set_default_params(self, params: SearchParams) -> None:
        """Keep ``params.ef_search`` as the default ``hnsw_ef``; IVF and refine parameters do not apply.

        Raises:
            ValueError: ``nprobe`` or ``k_factor`` set.
        """
        _check_params(params)
        self._ef_search = params.ef_search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        *,
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best stored vectors per query, ``(scores float32 (Q, k'), ids int64 (Q, k'))``, best first.

        ``k' = min(k, ntotal)``; slots without a hit (a filter leaving fewer than ``k'`` items) hold ``NO_ID``
        and -FLT_MAX, as FAISS's do. Several queries go to the server in ``query_batch_points`` requests. The
        collection is counted only when some query comes back short (or ``k`` is huge), so the usual search is
        one request.

        Raises:
            ValueError: bad queries (wrong shape, non-finite, zero), ``k``, or parameters.
        """
        k = check_k(k)
        queries, norms = self._check_queries(queries)
        search_params = self._search_params(params)
        query_filter = self._filter(where, allowed_ids)
        counted = k > _COUNT_FIRST_ABOVE or queries.shape[0] == 0 or query_filter is False
        if counted:
            k = min(k, self.ntotal)
        answers = [] if k == 0 or query_filter is False else self._query(queries, k, query_filter, search_params, None)
        if not counted and any(len(points) < k for points in answers):
            k = min(k, self.ntotal)
        scores = np.full((queries.shape[0], k), _EMPTY_SCORE, np.float32)
        ids = np.full((queries.shape[0], k), NO_ID, np.int64)
        for row, points in enumerate(answers):
            found = len(points)
            ids[row, :found] = [point.id for point in points]
            scores[row, :found] = np.array([point.score for point in points], np.float64) * norms[row]
        return scores, ids

    def range_search(
        self,
        queries: np.ndarray,
        threshold: float,
        params: SearchParams | None = None,
        *,
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> RangeSearchResult:
        """Every stored vector scoring strictly above ``threshold`` per query, best first.

        Qdrant's ``score_threshold`` keeps scores at or above it, so each query asks for hits from just below the
        threshold with a limit doubled (from 64) until fewer than the limit come back, and keeps those strictly
        above it. On a server with HNSW the hits are those the graph search finds (``exact`` makes it a full scan).

        Raises:
            ValueError: bad queries, a non-finite threshold, or bad parameters.
        """
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        queries, norms = self._check_queries(queries)
        search_params = self._search_params(params)
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int64))
        hits: list[tuple[np.ndarray, np.ndarray]] = [empty] * queries.shape[0]
        ntotal = self.ntotal
        query_filter = self._filter(where, allowed_ids)
        if ntotal == 0 or query_filter is False:
            return RangeSearchResult.from_hits(hits, fallback=False)
        cosine_thresholds = threshold / norms - _RANGE_SLACK
        pending, limit = np.arange(queries.shape[0]), min(_RANGE_FIRST_LIMIT, ntotal)
        while pending.size:
            answers = self._query(queries[pending], limit, query_filter, search_params, cosine_thresholds[pending])
            unfinished = []
            for row, points in zip(pending, answers, strict=True):
                if len(points) == limit and limit < ntotal:
                    unfinished.append(row)
                    continue
                found_ids = np.array([point.id for point in points], np.int64)
                found_scores = np.array([point.score for point in points], np.float64) * norms[row]
                keep = found_scores > threshold
                hits[row] = (found_scores[keep].astype(np.float32), found_ids[keep])
            pending, limit = np.array(unfinished, np.int64), min(2 * limit, ntotal)
        return RangeSearchResult.from_hits(hits, fallback=False)

    def _query(
        self,
        queries: np.ndarray,
        limit: int,
        query_filter: Any,
        search_params: Any,
        thresholds: np.ndarray | None,
    ) -> list[list[Any]]:
        """The scored points of each query (cosine scores, best first): one request per query batch."""
        _, models = import_qdrant()
        answers: list[list[Any]] = []
        for start in range(0, queries.shape[0], _QUERY_BATCH):
            chunk = queries[start : start + _QUERY_BATCH]
            requests = [
                models.QueryRequest(
                    query=query.tolist(),
                    limit=limit,
                    filter=query_filter,
                    params=search_params,
                    with_payload=False,
                    score_threshold=None if thresholds is None else float(thresholds[start + row]),
                )
                for row, query in enumerate(chunk)
            ]
            if len(requests) == 1:  # one query: the plain endpoint, no batch envelope
                request = requests[0]
                response = self._call(
                    "query_points",
                    collection_name=self._physical,
                    query=request.query,
                    limit=limit,
                    query_filter=query_filter,
                    search_params=search_params,
                    with_payload=False,
                    score_threshold=request.score_threshold,
                )
                answers.append(response.points)
            else:
                responses = self._call("query_batch_points", collection_name=self._physical, requests=requests)
                answers.extend(response.points for response in responses)
        return answers

    def _search_params(self, params: SearchParams | None) -> Any:
        """Qdrant ``SearchParams`` for a server (``hnsw_ef``, ``exact``); None in local mode, which is always exact."""
        if params is not None:
            _check_params(params)
        ef_search = self._ef_search if params is None or params.ef_search is None else params.ef_search
        if self._location.is_local or (ef_search is None and not self._exact):
            return None
        _, models = import_qdrant()
        return models.SearchParams(hnsw_ef=ef_search, exact=self._exact)

    def _filter(self, where: LabelFilter | None, allowed_ids: np.ndarray | None) -> Any:
        """A Qdrant ``Filter`` for ``where`` and ``allowed_ids``; None for no filter, False when nothing can match."""
        _, models = import_qdrant()
        conditions: list[Any] = []
        if where is not None:
            if not isinstance(where, LabelFilter):
                raise ValueError(f"where must be a LabelFilter, got {type(where).__name__}")
            conditions.append(
                models.FieldCondition(key=f"labels.{where.level}", match=models.MatchAny(any=list(where.values)))
            )
        if allowed_ids is not None:
            allowed = np.asarray(allowed_ids).reshape(-1)
            if allowed.size and not np.issubdtype(allowed.dtype, np.integer):
                raise ValueError(f"allowed_ids must be integers, got dtype {allowed.dtype}")
            allowed = np.unique(allowed.astype(np.int64))
            allowed = allowed[allowed >= 0]  # negative ids are never stored
            if not allowed.size:
                return False
            conditions.append(models.HasIdCondition(has_id=allowed.tolist()))
        return models.Filter(must=conditions) if conditions else None

    # ------------------------------------------------------------------ persistence

    def write_to(self, directory: Path) -> dict[str, Any]:
        """The backend options naming this collection; the vectors are already in Qdrant, so no file is written."""
        options: dict[str, Any] = {"url": self.url, "collection": self._collection, "physical": self._physical}
        if self._exact:
            options["exact"] = True
        return options

    def publish(self, previous: Manifest | None) -> None:
        """Point the alias at this collection in one atomic call, then drop the previous directory's collection.

        The previous collection is dropped only when the previous manifest is a Qdrant one at the same location
        and names another physical collection; a collection the alias pointed at that no manifest named is left
        (and logged), since another index directory may still read it.
        """
        _, models = import_qdrant()
        current = self.alias_target()
        operations = []
        if current is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._collection)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=self._physical, alias_name=self._collection)
            )
        )
        self._call("update_collection_aliases", change_aliases_operations=operations)
        previous_physical = _previous_physical(_backend_options(previous), self.url)
        if previous_physical is not None and previous_physical != self._physical:
            self._call("delete_collection", collection_name=previous_physical)
            logger.info("dropped the previous Qdrant collection %s at %s", previous_physical, self.url)
        if current not in (None, self._physical, previous_physical):
            logger.warning(
                "alias %s moved from %s, which the previous index did not name; that collection was kept",
                self._collection,
                current,
            )

    def discard(self) -> None:
        """Drop the physical collection this index created (a write that failed); an opened one is never dropped.

        Failures are logged, not raised: the caller is already handling the error that made it discard, and a
        leftover collection is named in the log.
        """
        if not self._created:
            return
        try:
            self._call("delete_collection", collection_name=self._physical)
        except Exception as exc:  # cleanup after another failure must not hide it
            logger.warning("could not drop Qdrant collection %s at %s: %s", self._physical, self.url, exc)

    def describe(self) -> dict[str, Any]:
        """Backend, location (no API key), alias, physical collection, size and Qdrant's collection status."""
        info = self._call("get_collection", self._physical)
        status = getattr(info.status, "value", info.status)
        return {
            "backend": self.backend,
            "url": self.url,
            "collection": self._collection,
            "physical": self._physical,
            "ntotal": self.ntotal,
            "status": str(status),
            "exact": self._exact or self._location.is_local,
        }

    def close(self) -> None:
        """Release this index's use of the shared client (which stays open for others); later calls raise."""
        connection, self._connection = self._connection, None
        if connection is not None:
            release_connection(connection)

    # ------------------------------------------------------------------ helpers

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._connection is None:
            raise RuntimeError(f"the Qdrant index on {self._physical!r} is closed")
        return self._connection.call(method, *args, **kwargs)

    def _check_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 queries and their norms (float64); a zero query has no cosine and is refused."""
        queries = check_vectors(queries, self._dim, "queries")
        norms = np.linalg.norm(queries.astype(np.float64), axis=1)
        if (norms == 0).any():
            raise ValueError("queries must be non-zero vectors")
        return queries, norms

    def __repr__(self) -> str:
        return f"QdrantIndex(url={self.url!r}, collection={self._collection!r}, physical={self._physical!r})"


def _check_alias_free(connection: QdrantConnection, collection: str) -> None:
    """Refuse an alias name taken by a real collection: ``publish`` could not create the alias after the build."""
    from retrieval.config import ConfigError

    aliases = {alias.alias_name for alias in connection.call("get_aliases").aliases}
    if collection not in aliases and connection.call("collection_exists", collection):
        raise ConfigError(
            f"a Qdrant collection named {collection!r} already exists at {connection.location.url}; the index needs "
            "that name for its alias: choose another collection name or delete that collection"
        )


def _vector_size(info: Any, physical: str) -> int:
    """The dimension of a collection's single unnamed vector."""
    vectors = info.config.params.vectors
    size = getattr(vectors, "size", None)
    if size is None:
        raise ValueError(f"Qdrant collection {physical!r} has named vectors; this backend uses one unnamed vector")
    return int(size)


def _check_params(params: SearchParams) -> None:
    if not isinstance(params, SearchParams):
        raise ValueError(f"params must be SearchParams, got {type(params).__name__}")
    if params.nprobe is not None or params.k_factor is not None:
        raise ValueError("the qdrant backend takes only ef_search (Qdrant's hnsw_ef); nprobe and k_factor are FAISS's")


def _payloads(labels: Sequence[Mapping[str, str]] | None, count: int) -> list[dict[str, Any]] | None:
    """``[{"labels": {level: value}}]`` per vector, or None without labels."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or len(labels) != count:
        raise ValueError(f"labels must be one mapping per vector ({count}), got {type(labels).__name__}")
    payloads = []
    for item in labels:
        if not isinstance(item, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in item.items()):
            raise ValueError(f"each item's labels must map level names to strings, got {item!r}")
        payloads.append({"labels": dict(item)})
    return payloads


def _backend_options(manifest: Manifest | None) -> Mapping[str, Any] | None:
    """A previous manifest's Qdrant backend options; None for no manifest or one of another backend."""
    if manifest is None or manifest.backend != QdrantIndex.backend:
        return None
    return manifest.backend_options or None


def _previous_physical(options: Mapping[str, Any] | None, url: str) -> str | None:
    """The physical collection previous backend options named at the same location, else None."""
    physical = (options or {}).get("physical")
    if not isinstance(physical, str) or not _NAME_PATTERN.match(physical):
        return None
    try:
        same_place = QdrantLocation.parse(options.get("url", "")).url == url
    except ValueError:
        return None
    return physical if same_place else None
