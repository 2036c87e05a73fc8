"""FAISS as the embedded vector backend: inner product on unit vectors, the engine's own int64 ids.

Encoders emit L2-normalised embeddings, so inner product equals cosine similarity and the
index ranks exactly as training losses and evaluation metrics do. Items keep the ids the
engine gives them, so the metadata store, shards and incremental adds never depend on FAISS's
internal insertion order. Any ``faiss.index_factory`` string can be wrapped ("Flat" is exact
search; IVF/PQ strings need ``train`` first). As the FAISS wiki recommends, IVF indexes
(``IVFk,...``, with or without an OPQ/PCA pre-transform) store the ids in their inverted lists
(``add_with_ids``), and every other type is wrapped in an ``IndexIDMap2``.

FAISS's refine family ("IVF4096_HNSW32,PQ64x4fs,RFlat", "...,Refine(SQfp16)", "HNSW32_SQ8,RFlat") is
supported: a fast approximate base index (often 4-bit PQ fast-scan) proposes ``k * k_factor`` candidates
that are re-ranked with the vectors of a second, more exact store (full floats, fp16 or SQ8). Such an
``IndexRefine`` takes no ids itself, so it is wrapped in an ``IndexIDMap2`` like the other non-IVF
types; ``reconstruct`` returns the refine store's vectors (exact for RFlat, decoded for SQ), and the
recall that tuning measures is against exact search over those.

Search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW, ``k_factor`` for refine) are stored
in the index as defaults, can be tuned for a target recall (``tune``) and overridden per call with
``SearchParams``. Where faiss-gpu is installed and a GPU is visible, training, adding and
searching run on a GPU replica, while the CPU index stays the copy that is saved and read.

``FaissIndex`` is the ``VectorIndex`` registered as "faiss". Its seams live in sibling modules:
``faiss_layers`` (what a FAISS object is made of), ``faiss_placement`` (CPU or GPU), ``faiss_params``
(search parameters), ``faiss_filter`` (search among allowed ids), ``faiss_range`` (range search),
``faiss_tuning`` (recall tuning) and ``faiss_kmeans`` (coarse training); inputs are checked by
``vector_checks``, the checks every backend shares.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from indexing import faiss_params, faiss_range, faiss_tuning
from indexing.faiss_filter import empty_hits, filtered_search, refuse_where, stored_subset
from indexing.faiss_kmeans import two_level_kmeans
from indexing.faiss_layers import (
    COARSE_EF_SEARCH,
    faiss_lib,
    has_pretransform,
    ivf_of,
    numpy_method,
    refine_of,
    takes_ids_natively,
    widen_coarse_search,
)
from indexing.faiss_placement import Device, gpu_available, to_gpu, use_gpu
from indexing.faiss_tuning import TuneResult, per_query_recall, recall_at_k, recall_lower_bound
from indexing.index_factory import training_sample_size
from indexing.vector_checks import as_ids, check_new_ids, check_unit_norm, check_vectors
from indexing.vector_index import (
    NO_ID,
    VECTOR_BACKENDS,
    LabelFilter,
    RangeSearchResult,
    SearchParams,
    VectorIndex,
    check_k,
)
from retrieval.config import ConfigError

if TYPE_CHECKING:
    from indexing.manifest import Manifest

__all__ = [
    "COARSE_EF_SEARCH",
    "INDEX_FILE",
    "NO_ID",
    "TWO_LEVEL_MIN_NLIST",
    "Device",
    "FaissIndex",
    "RangeSearchResult",
    "SearchParams",
    "TuneResult",
    "gpu_available",
    "per_query_recall",
    "recall_at_k",
    "recall_lower_bound",
]

logger = logging.getLogger(__name__)

#: The file ``write_to`` writes into an index directory (and ``open`` reads).
INDEX_FILE = "index.faiss"
#: Vectors reconstructed per step when scanning the whole index (tuning ground truth, ``reconstruct_all``).
_CHUNK = 16_384
#: From this many IVF lists on, the coarse quantiser is trained by two-level k-means (sqrt(nlist)
#: groups, then sqrt(nlist) lists inside each): a flat k-means over 4096+ centroids costs
#: O(sample x nlist x d) per iteration, tens of minutes on two cores at 1M x 512, the two-level one
#: ~sqrt(nlist) times less (``indexing.faiss_kmeans``).
TWO_LEVEL_MIN_NLIST = 2048

#: The IVF layer of a FAISS object, under the name tests and scripts written before the split use.
_ivf_of = ivf_of


@VECTOR_BACKENDS.register("faiss")
class FaissIndex(VectorIndex):
    """``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` holding the engine's int64 ids.

    Args:
        dim: embedding dimension.
        factory: ``faiss.index_factory`` description ("Flat" = exact; "HNSW32"; "IVF1024,Flat";
            "IVF4096,PQ64"; "OPQ64,IVF4096,PQ64"; refine: "IVF4096_HNSW32,PQ128x4fs,RFlat",
            "...,Refine(SQ8)", "HNSW32_SQ8,RFlat" ...); ``indexing.index_factory.choose_factory``
            picks one from the gallery size and a memory budget.
        device: "auto" uses a GPU when faiss-gpu sees one, "cpu" never does, "gpu" requires one.

    Raises:
        ValueError: a non-positive dimension, a factory string FAISS does not understand, or
            ``device="gpu"`` without a usable GPU.
    """

    backend = "faiss"
    files = (INDEX_FILE,)

    def __init__(self, dim: int, factory: str = "Flat", *, device: Device = "auto") -> None:
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        faiss = faiss_lib()
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid FAISS index factory string {factory!r}: {exc}") from exc
        if isinstance(inner, faiss.IndexIDMap):
            raise ConfigError(f"factory {factory!r}: leave out IDMap, FaissIndex maps ids itself")
        widen_coarse_search(inner)
        index = inner if takes_ids_natively(inner) else faiss.IndexIDMap2(inner)
        self._setup(index, factory, device)

    def _setup(self, index: Any, factory: str, device: Device) -> None:
        gpu = use_gpu(device)  # validates ``device`` first
        self._index = index  # the CPU index: what is saved, listed and reconstructed
        self.factory = factory
        self._gpu: Any = None  # GPU replica kept in sync with self._index, or None
        self._lock = threading.Lock()  # guards temporary direct maps of IVF indexes
        if gpu:
            self._gpu = to_gpu(self._index, self.factory)

    @classmethod
    def create(cls, dim: int, factory: str, options: Mapping[str, Any]) -> FaissIndex:
        """``FaissIndex(dim, factory)``: the interface's constructor; FAISS takes no backend options.

        Raises:
            ConfigError: options given, or a factory string FAISS does not understand.
        """
        if options:
            raise ConfigError(f"the faiss backend takes no backend options, got {sorted(options)}")
        return cls(dim, factory)

    @classmethod
    def _wrap(cls, index: Any, factory: str, device: Device = "auto") -> FaissIndex:
        obj = cls.__new__(cls)
        obj._setup(index, factory, device)
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
        """The underlying CPU FAISS object (an ``IndexIDMap2``, or an IVF index holding the ids itself)."""
        return self._index

    @property
    def on_gpu(self) -> bool:
        """Whether training, adding and searching run on a GPU replica."""
        return self._gpu is not None

    @property
    def native_ids(self) -> bool:
        """True for IVF types, whose inverted lists store the ids; False for ``IndexIDMap2``-wrapped types."""
        return not isinstance(self._index, faiss_lib().IndexIDMap)

    @property
    def is_refine(self) -> bool:
        """True for refine indexes (``...,RFlat``, ``...,Refine(SQ8)``): candidates re-ranked from a second store."""
        return refine_of(self._index) is not None

    @property
    def nlist(self) -> int | None:
        """Number of IVF lists, None for non-IVF types."""
        ivf = ivf_of(self._index)
        return None if ivf is None else int(ivf.nlist)

    # ------------------------------------------------------------------ ids and vectors

    def ids(self) -> np.ndarray:
        """All stored ids, int64: in insertion order for id-mapped types, in inverted-list order for IVF types."""
        faiss = faiss_lib()
        if isinstance(self._index, faiss.IndexIDMap):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        invlists = ivf_of(self._index).invlists
        parts = [np.zeros(0, np.int64)]
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64))
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts)

    def reconstruct_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored ``(ids, vectors)``, in ``ids()`` order; exact for Flat/HNSW/IVF-Flat, decoded for PQ/SQ.

        Refine indexes return their refine store's vectors (exact for RFlat, decoded for SQfp16/SQ8).
        """
        ids, vectors = [np.zeros(0, np.int64)], [np.zeros((0, self.dim), np.float32)]

        def collect(chunk_ids: np.ndarray, chunk: np.ndarray) -> None:
            ids.append(chunk_ids)
            vectors.append(chunk)

        self.scan(collect)
        return np.concatenate(ids), np.concatenate(vectors)

    def scan(self, consume: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Call ``consume(ids, vectors)`` on successive chunks of every stored vector, in ``ids()`` order.

        Memory stays at one chunk (16,384 vectors), so a full check of a large index does not need its size twice.
        """
        ids = self.ids()
        faiss = faiss_lib()
        with self._direct_map():
            for start in range(0, ids.size, _CHUNK):
                chunk_ids = ids[start : start + _CHUNK]
                if isinstance(self._index, faiss.IndexIDMap):
                    chunk = self._index.index.reconstruct_n(start, chunk_ids.size)
                else:
                    chunk = self._index.reconstruct_batch(np.ascontiguousarray(chunk_ids))
                consume(chunk_ids, np.asarray(chunk, dtype=np.float32))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored (or decoded) vectors of the given ids, ``(len(ids), dim)`` float32.

        Raises:
            ValueError: an id that is not in the index.
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        missing = ids[~np.isin(ids, self.ids())]
        if missing.size:
            raise ValueError(f"ids not in the index: {missing[:5].tolist()}")
        return self._reconstruct_stored(ids)

    def _reconstruct_stored(self, ids: np.ndarray) -> np.ndarray:
        """``reconstruct`` of ids known to be stored (no membership check; ``faiss_filter`` uses it)."""
        if not ids.size:
            return np.zeros((0, self.dim), np.float32)
        with self._direct_map():
            return np.asarray(self._index.reconstruct_batch(np.ascontiguousarray(ids, np.int64)), dtype=np.float32)

    # ------------------------------------------------------------------ building

    def train(self, vectors: np.ndarray, *, seed: int = 0) -> None:
        """Train the index on a seeded random sample of ``vectors``; a no-op for indexes that need none.

        The sample has ``training_sample_size(factory, len(vectors))`` rows: enough points per
        IVF centroid and PQ code for stable k-means (see ``indexing.index_factory``), no more, so
        training time does not grow with the gallery. Pass the whole gallery or any superset of
        the sample.

        Raises:
            ValueError: bad vectors, or too few of them for the index (e.g. fewer than IVF lists).
        """
        if self.is_trained:
            return
        vectors = check_vectors(vectors, self.dim, "training vectors")
        size = training_sample_size(self.factory, len(vectors)) or len(vectors)
        if size < len(vectors):
            rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
            vectors = vectors[rows]
        logger.info("training %s on %d sample vectors%s", self.factory, len(vectors), " on GPU" if self.on_gpu else "")
        try:
            self._train_coarse_two_level(vectors, seed)
            if self.on_gpu:
                self._gpu.train(vectors)
                self._index = faiss_lib().index_gpu_to_cpu(self._gpu)
            else:
                self._index.train(vectors)
        except RuntimeError as exc:  # e.g. fewer training vectors than IVF centroids
            raise ConfigError(f"index {self.factory!r} cannot be trained on {len(vectors)} vectors: {exc}") from exc

    def _train_coarse_two_level(self, vectors: np.ndarray, seed: int) -> None:
        """Fill a large IVF's coarse quantiser by two-level k-means; FAISS then trains only the codes.

        Only on CPU, from ``TWO_LEVEL_MIN_NLIST`` lists on (see there), and without a pre-transform
        (OPQ, PCA), whose space is only known once FAISS has trained it. FAISS's IVF skips its own
        k-means when the quantiser already holds ``nlist`` centroids. The k-means is spherical for
        inner-product indexes, as FAISS's own IVF training is.
        """
        ivf = ivf_of(self._index)
        if self.on_gpu or ivf is None or ivf.nlist < TWO_LEVEL_MIN_NLIST or ivf.quantizer.ntotal:
            return
        if len(vectors) < ivf.nlist:  # FAISS's own training then refuses it with its usual message
            return
        if has_pretransform(self._index):
            return
        nlist = int(ivf.nlist)
        spherical = ivf.metric_type == faiss_lib().METRIC_INNER_PRODUCT
        ivf.quantizer.add(two_level_kmeans(vectors, nlist, spherical=spherical, seed=seed))
        logger.info("trained the %d-list coarse quantiser of %s by two-level k-means", nlist, self.factory)

    def add(self, vectors: np.ndarray, ids: np.ndarray, labels: Sequence[Mapping[str, str]] | None = None) -> None:
        """Add L2-normalised vectors under the given int64 ids.

        Args:
            vectors: ``(N, dim)`` floating array of unit-norm vectors (converted to float32).
            ids: ``(N,)`` integer ids, unique, not already stored, never ``-1`` (FAISS's "no result").
            labels: ignored: FAISS stores no labels (the index directory's metadata holds them and resolves
                label filters to ``allowed_ids``).

        Raises:
            ValueError: wrong shape, dtype or dimension, non-finite or non-unit vectors, bad ids,
                or an index that needs training first.
        """
        vectors = check_vectors(vectors, self.dim, "vectors")
        ids = check_new_ids(ids, vectors.shape[0], self.ids() if self.ntotal else None)
        check_unit_norm(vectors)
        if not self.is_trained:
            raise ValueError(f"the {self.factory!r} index must be trained (FaissIndex.train) before adding vectors")
        if not vectors.shape[0]:
            return
        if self.on_gpu:
            self._gpu.add_with_ids(vectors, ids)
            self._index = faiss_lib().index_gpu_to_cpu(self._gpu)
        else:
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Delete the given ids from the index; ids that are not stored are ignored.

        Flat, PQ, SQ and IVF types use FAISS's ``remove_ids`` (IVF compacts each list, O(ntotal)). FAISS cannot
        delete from an HNSW graph or a refine pair, so those are rebuilt from their stored vectors minus the
        removed ones (O(ntotal) adds, a warning is logged; a ``Refine(SQ...)`` store re-encodes its decoded
        vectors). A GPU replica is copied again from the CPU index afterwards.

        Returns:
            How many vectors were removed.

        Raises:
            ValueError: ``ids`` is not a 1-D integer array.
        """
        ids = np.unique(as_ids(ids, "ids"))
        if not ids.size or not self.ntotal:
            return 0
        try:
            removed = int(self._index.remove_ids(faiss_lib().IDSelectorBatch(ids)))
        except RuntimeError:  # "remove_ids not implemented for this type of index"
            removed = self._rebuild_without(ids)
        if removed and self._gpu is not None:
            self._gpu = to_gpu(self._index, self.factory)
        return removed

    def _rebuild_without(self, ids: np.ndarray) -> int:
        """Empty the (trained) index and add back every stored vector whose id is not in ``ids``."""
        stored, vectors = self.reconstruct_all()
        keep = ~np.isin(stored, ids)
        removed = int(stored.size - keep.sum())
        if removed:
            logger.warning(
                "FAISS cannot delete from %s in place; rebuilding it from its %d remaining vectors",
                self.factory,
                int(keep.sum()),
            )
            self._index.reset()  # keeps what training learned (quantisers, codebooks, graph parameters)
            if keep.any():
                self._index.add_with_ids(vectors[keep], stored[keep])
        return removed

    # ------------------------------------------------------------------ search parameters

    @property
    def default_params(self) -> SearchParams:
        """The search parameters stored in the index (and saved with it) that ``search`` uses by default."""
        return faiss_params.default_params(self._index)

    def set_default_params(self, params: SearchParams) -> None:
        """Store ``params`` as the index's defaults; they are written with the index by ``save``.

        Raises:
            ValueError: a parameter that does not apply to this index type.
        """
        faiss_params.set_default_params(self._index, self._gpu, params, self.factory)

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        *,
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored vectors for each query, optionally among ``allowed_ids`` only.

        ``k`` is clipped to the number of stored vectors. Approximate index types may still
        return fewer than ``k`` neighbours for a query; those slots hold id ``NO_ID`` (-1) and
        score ``-inf``-like values and must be dropped by the caller.

        With ``allowed_ids`` (``indexing.faiss_filter``): IVF types filter with a FAISS ``IDSelectorBatch``,
        nprobe widened by the inverse of the allowed share (every list for queries still short of hits);
        other types scan up to 16,384 allowed ids exactly over their stored vectors, and filter a larger set
        with a selector (Flat, SQ, HNSW with a widened efSearch) or, where FAISS has none (refine, PQ), with a
        k-NN search of growing depth. Filtered searches run on the CPU index, also with a GPU replica.

        Args:
            queries: ``(Q, dim)`` floating array (converted to float32).
            k: number of neighbours wanted, at least 1.
            params: per-call search parameters; None uses ``default_params``.
            where: not supported: FAISS stores no labels (the index directory resolves label filters to ids).
            allowed_ids: restrict the hits to these ids (absent ones are ignored; an empty array allows none).

        Returns:
            ``(scores float32 (Q, k'), ids int64 (Q, k'))`` best first, with ``k' = min(k, ntotal)``.

        Raises:
            ValueError: bad queries, ``k`` or ``allowed_ids``, a parameter that does not apply to this
                index type, or a ``where`` filter.
        """
        k = check_k(k)
        refuse_where(where)
        queries = check_vectors(queries, self.dim, "queries")
        faiss_search_params = faiss_params.search_parameters(self._index, params, self.factory)
        if allowed_ids is not None:
            return filtered_search(self, queries, k, params, stored_subset(self, allowed_ids))
        k = min(k, self.ntotal)
        if k == 0 or queries.shape[0] == 0:
            return empty_hits(queries.shape[0], k)
        scores, ids = numpy_method(self._searcher, "search")(queries, k, params=faiss_search_params)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    @property
    def supports_range_search(self) -> bool:
        """Whether FAISS implements range search for this index type on CPU (not for NSG, PQ fast-scan, shards ...).

        Refine indexes never use FAISS's: it would filter on the base index's approximate scores (or, over
        fast-scan, not run at all), not on the re-ranked ones ``search`` returns.
        """
        return faiss_range.supports_range_search(self)

    def range_search(
        self,
        queries: np.ndarray,
        threshold: float,
        params: SearchParams | None = None,
        *,
        method: Literal["auto", "native", "knn"] = "auto",
        where: LabelFilter | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> RangeSearchResult:
        """All stored vectors scoring strictly above ``threshold`` for each query, best first.

        FAISS's range search is used where it exists (CPU Flat, IVF, HNSW, PQ, SQ ...); with a
        GPU replica it runs on the CPU copy, since FAISS's GPU indexes have none. Sharded indexes
        and a few CPU types (NSG, PQ fast-scan) lack it too; there a k-NN search is repeated with
        a doubling k until every query's k-th hit falls below the threshold (a warning is logged
        and ``fallback`` is set on the result). ``method="knn"`` forces that path, e.g. to keep a
        range query on the GPU. With ``allowed_ids`` the path is chosen as for ``search`` (IVF types
        filter over every list when at most 16,384 ids are allowed, which is exact over their codes).

        Args:
            queries: ``(Q, dim)`` floating array.
            threshold: cosine similarity hits must exceed.
            params: per-call search parameters, as for ``search``.
            method: "auto" (native where supported), "native" (error where not) or "knn" (always the fallback).
            where: not supported: FAISS stores no labels (the index directory resolves label filters to ids).
            allowed_ids: restrict the hits to these ids (absent ones are ignored; an empty array allows none).

        Raises:
            ValueError: bad queries, parameters or ``allowed_ids``, a ``where`` filter, or ``method="native"``
                on an index without range search.
        """
        refuse_where(where)
        queries = check_vectors(queries, self.dim, "queries")
        allowed = None if allowed_ids is None else stored_subset(self, allowed_ids)
        return faiss_range.range_search(self, queries, float(threshold), params, method=method, allowed=allowed)

    # ------------------------------------------------------------------ tuning

    def tune(
        self,
        queries: np.ndarray | None = None,
        target_recall: float = 0.95,
        k: int = 10,
        *,
        query_ids: np.ndarray | None = None,
        num_queries: int = 500,
        seed: int = 0,
        apply: bool = True,
    ) -> TuneResult:
        """Find the smallest ``nprobe`` (IVF) or ``efSearch`` (HNSW) reaching ``target_recall`` at ``k``.

        For refine indexes, the cheapest pair of that parameter and ``k_factor`` (see ``faiss_tuning``).

        Ground truth is an exact scan of the index's own stored (for PQ/SQ: decoded) vectors, so
        the recall measures what the search parameter controls, the part of the index left
        unvisited, and not the compression loss no parameter can undo. The value is found by
        doubling from the smallest and then bisecting, assuming recall grows with it. A value passes when
        the one-sided 95% lower confidence bound of its recall over the queries reaches the target
        (``recall_lower_bound``), so that other queries, the real ones, land at or above it too.

        Queries should look like real ones. For a compressed index (PQ, SQ) the default,
        decoded stored vectors, sit closer to their IVF centroid than real embeddings do and
        under-estimate nprobe; pass the original embeddings of some gallery items instead, with
        their ids as ``query_ids``.

        Args:
            queries: ``(Q, dim)`` sample queries (held-out or gallery embeddings); None samples
                ``num_queries`` of the index's own (decoded) vectors.
            target_recall: recall@k to reach, in (0, 1].
            k: neighbours per query.
            query_ids: ``(Q,)`` ids of the queries when they are stored items: each is left out of
                its own results and ground truth (implied when ``queries`` is None).
            num_queries: queries sampled when ``queries`` is None.
            seed: seeds that sample.
            apply: store the chosen parameters as the index's defaults (``set_default_params``).

        Returns:
            the chosen parameters and the recall they reach; for types without a search parameter
            (Flat, PQ) the parameters are empty and the recall is measured as is.
        """
        return faiss_tuning.tune(
            self,
            queries,
            target_recall,
            k,
            query_ids=query_ids,
            num_queries=num_queries,
            seed=seed,
            apply=apply,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the index (vectors, ids and default search parameters) to one file."""
        faiss_lib().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: str | Path, factory: str = "Flat", *, device: Device = "auto") -> FaissIndex:
        """Read an index written by ``save``.

        Args:
            path: the index file.
            factory: the factory string it was built with (the file does not record it; the manifest does).
            device: as for the constructor.

        Raises:
            ValueError: the file is unreadable, neither id-mapped nor IVF, or not inner-product.
        """
        faiss = faiss_lib()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read FAISS index {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2) and not takes_ids_natively(index):
            raise ValueError(
                f"{path} holds a {type(index).__name__}, expected an id-mapped index (IndexIDMap2) or an IVF index"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} is not an inner-product index (metric type {index.metric_type})")
        widen_coarse_search(index)  # files written before COARSE_EF_SEARCH keep FAISS's default of 16
        return cls._wrap(index, factory, device)

    def write_to(self, directory: Path) -> dict[str, Any]:
        """Save the index as ``INDEX_FILE`` in ``directory``; the manifest needs nothing more to open it."""
        self.save(Path(directory) / INDEX_FILE)
        return {}

    @classmethod
    def open(cls, directory: Path, manifest: Manifest) -> FaissIndex:
        """Load ``INDEX_FILE`` from ``directory`` with the manifest's factory and tuned search parameters.

        Raises:
            FileNotFoundError, ValueError: the file is missing or unreadable, or the parameters do not fit it.
        """
        index = cls.load(Path(directory) / INDEX_FILE, factory=manifest.factory)
        if manifest.search_params:
            index.set_default_params(SearchParams.from_dict(manifest.search_params))
        return index

    def describe(self) -> dict[str, Any]:
        """Backend state for ``retrieval index info``."""
        return {
            "backend": self.backend,
            "ntotal": self.ntotal,
            "is_trained": self.is_trained,
            "nlist": self.nlist,
            "native_ids": self.native_ids,
            "default_params": self.default_params.to_dict(),
            "factory": self.factory,
        }

    # ------------------------------------------------------------------ internals

    @property
    def _searcher(self) -> Any:
        return self._gpu if self._gpu is not None else self._index

    @contextmanager
    def _direct_map(self) -> Iterator[None]:
        """Let an IVF index look vectors up by id for the duration (a hash table for native ids)."""
        faiss = faiss_lib()
        ivf = ivf_of(self._index)
        if ivf is None or ivf.direct_map.type != faiss.DirectMap.NoMap or refine_of(self._index) is not None:
            yield  # refine indexes reconstruct from their refine store, by position, through the id map
            return
        kind = faiss.DirectMap.Hashtable if self.native_ids else faiss.DirectMap.Array
        with self._lock:
            ivf.set_direct_map_type(kind)
            try:
                yield
            finally:
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)

    def __repr__(self) -> str:
        return f"FaissIndex(dim={self.dim}, factory={self.factory!r}, ntotal={self.ntotal})"
