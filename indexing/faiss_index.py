"""A small wrapper around a FAISS index: inner product on unit vectors, the engine's own int64 ids.

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
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from indexing.index_factory import training_sample_size
from retrieval.config import ConfigError

__all__ = [
    "NO_ID",
    "FaissIndex",
    "RangeSearchResult",
    "SearchParams",
    "TuneResult",
    "gpu_available",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

#: The id FAISS returns for an empty result slot; it can therefore never be an item id.
NO_ID = -1
#: How far a vector's L2 norm may be from 1 before ``add`` refuses it.
_NORM_TOLERANCE = 1e-3
#: Vectors reconstructed per step when scanning the whole index (tuning ground truth, ``reconstruct_all``).
_CHUNK = 16_384
#: First k of the k-NN range-search fallback; doubled until the k-th hit falls below the threshold.
_RANGE_FALLBACK_K = 64
#: Largest k (and nprobe) FAISS's GPU k-selection supports.
_GPU_MAX_K = 2048
#: Largest efSearch ``tune`` tries.
_MAX_EF_SEARCH = 4096
#: Re-ranking depths ``tune`` tries for refine indexes (candidates re-ranked = k * k_factor). Below 2
#: the refine store is wasted; above 64 re-ranking (a random access per candidate) costs more than
#: a wider base search.
_K_FACTORS = (2, 4, 8, 16, 32, 64)
#: From this many IVF lists on, the coarse quantiser is trained by two-level k-means (sqrt(nlist)
#: groups, then sqrt(nlist) lists inside each): a flat k-means over 4096+ centroids costs
#: O(sample x nlist x d) per iteration, tens of minutes on two cores at 1M x 512, the two-level one
#: ~sqrt(nlist) times less (faiss.contrib.clustering, the recipe FAISS uses for its billion-scale indexes).
TWO_LEVEL_MIN_NLIST = 2048
#: k-means iterations of each level of the two-level coarse training (FAISS's IVF default is 10 as well).
_TWO_LEVEL_NITER = 10
#: efSearch of the HNSW graph over IVF centroids ("IVF4096_HNSW32"). FAISS's default of 16 sends ~3% of
#: vectors to a list that is not their nearest when they are added (measured on bench_index.py's 512-d
#: vectors, 4096 centroids: 96.9% exact at 16, 99.4% at 32, 99.97% at 64), which caps recall@10 near
#: 0.93 whatever nprobe; 64 costs a few more distance computations per add and per query.
COARSE_EF_SEARCH = 64
#: One-sided 95% normal quantile of ``recall_lower_bound``.
_TUNE_CONFIDENCE_Z = 1.645

Device = Literal["auto", "cpu", "gpu"]


def _faiss() -> Any:
    import faiss  # imported lazily: heavy, and a GPU build may replace the CPU one

    return faiss


def _numpy_method(index: Any, name: str) -> Any:
    """The numpy form of an index method, even after ``faiss.contrib.torch_utils`` has been imported.

    That module (imported by pytorch-metric-learning, among others) replaces ``search``, ``range_search``
    and friends on every index class with torch-aware versions that drop the ``params`` argument; it keeps
    the originals as ``<name>_numpy``. Calling those keeps per-query search parameters working whatever
    else the process imported.
    """
    return getattr(index, f"{name}_numpy", None) or getattr(index, name)


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and at least one GPU is visible."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process: it reserves scratch memory on the device."""
    return _faiss().StandardGpuResources()


@dataclass(frozen=True)
class SearchParams:
    """Search-time parameters; None leaves the index's stored default.

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
    return float(per_query.mean()) - _TUNE_CONFIDENCE_Z * spread


class FaissIndex:
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

    def __init__(self, dim: int, factory: str = "Flat", *, device: Device = "auto") -> None:
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        faiss = _faiss()
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid FAISS index factory string {factory!r}: {exc}") from exc
        if isinstance(inner, faiss.IndexIDMap):
            raise ConfigError(f"factory {factory!r}: leave out IDMap, FaissIndex maps ids itself")
        _widen_coarse_search(inner)
        index = inner if _takes_ids_natively(inner) else faiss.IndexIDMap2(inner)
        self._setup(index, factory, device)

    def _setup(self, index: Any, factory: str, device: Device) -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not gpu_available():
            raise ValueError("device='gpu' but faiss has no GPU support here or no GPU is visible")
        self._index = index  # the CPU index: what is saved, listed and reconstructed
        self.factory = factory
        self._gpu: Any = None  # GPU replica kept in sync with self._index, or None
        self._lock = threading.Lock()  # guards temporary direct maps of IVF indexes
        if device != "cpu" and gpu_available():
            self._gpu = self._to_gpu(self._index)

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
        return not isinstance(self._index, _faiss().IndexIDMap)

    @property
    def is_refine(self) -> bool:
        """True for refine indexes (``...,RFlat``, ``...,Refine(SQ8)``): candidates re-ranked from a second store."""
        return _refine_of(self._index) is not None

    @property
    def nlist(self) -> int | None:
        """Number of IVF lists, None for non-IVF types."""
        ivf = _ivf_of(self._index)
        return None if ivf is None else int(ivf.nlist)

    # ------------------------------------------------------------------ ids and vectors

    def ids(self) -> np.ndarray:
        """All stored ids, int64: in insertion order for id-mapped types, in inverted-list order for IVF types."""
        faiss = _faiss()
        if isinstance(self._index, faiss.IndexIDMap):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        invlists = _ivf_of(self._index).invlists
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

        self._for_each_chunk(collect)
        return np.concatenate(ids), np.concatenate(vectors)

    def scan(self, consume: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Call ``consume(ids, vectors)`` on successive chunks of every stored vector, in ``ids()`` order.

        Memory stays at one chunk (16,384 vectors), so a full check of a large index does not need its size twice.
        """
        self._for_each_chunk(consume)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored (or decoded) vectors of the given ids, ``(len(ids), dim)`` float32.

        Raises:
            ValueError: an id that is not in the index.
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        missing = ids[~np.isin(ids, self.ids())]
        if missing.size:
            raise ValueError(f"ids not in the index: {missing[:5].tolist()}")
        with self._direct_map():
            return np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32)

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
        vectors = self._check_vectors(vectors, "training vectors")
        size = training_sample_size(self.factory, len(vectors)) or len(vectors)
        if size < len(vectors):
            rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
            vectors = vectors[rows]
        logger.info("training %s on %d sample vectors%s", self.factory, len(vectors), " on GPU" if self.on_gpu else "")
        try:
            self._train_coarse_two_level(vectors, seed)
            if self.on_gpu:
                self._gpu.train(vectors)
                self._index = _faiss().index_gpu_to_cpu(self._gpu)
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
        ivf = _ivf_of(self._index)
        if self.on_gpu or ivf is None or ivf.nlist < TWO_LEVEL_MIN_NLIST or ivf.quantizer.ntotal:
            return
        if len(vectors) < ivf.nlist:  # FAISS's own training then refuses it with its usual message
            return
        if _has_pretransform(self._index):
            return
        nlist = int(ivf.nlist)
        spherical = ivf.metric_type == _faiss().METRIC_INNER_PRODUCT
        ivf.quantizer.add(_two_level_kmeans(vectors, nlist, spherical=spherical, seed=seed))
        logger.info("trained the %d-list coarse quantiser of %s by two-level k-means", nlist, self.factory)

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
        if self.ntotal:
            stored = np.isin(unique, self.ids())
            if stored.any():
                raise ValueError(f"ids already in the index: {unique[stored][:5].tolist()}")
        norms = np.linalg.norm(vectors, axis=1)
        if vectors.shape[0] and np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
            worst = float(norms[np.abs(norms - 1.0).argmax()])
            raise ValueError(
                "vectors must be L2-normalised (the index ranks by inner product = cosine); "
                f"found a norm of {worst:.4f}"
            )
        if not self.is_trained:
            raise ValueError(f"the {self.factory!r} index must be trained (FaissIndex.train) before adding vectors")
        if not vectors.shape[0]:
            return
        if self.on_gpu:
            self._gpu.add_with_ids(vectors, ids)
            self._index = _faiss().index_gpu_to_cpu(self._gpu)
        else:
            self._index.add_with_ids(vectors, ids)

    # ------------------------------------------------------------------ search parameters

    @property
    def default_params(self) -> SearchParams:
        """The search parameters stored in the index (and saved with it) that ``search`` uses by default."""
        ivf, hnsw, refine = _ivf_of(self._index), _hnsw_of(self._index), _refine_of(self._index)
        return SearchParams(
            nprobe=None if ivf is None else int(ivf.nprobe),
            ef_search=None if hnsw is None else int(hnsw.efSearch),
            k_factor=None if refine is None else max(1, round(float(refine.k_factor))),
        )

    def set_default_params(self, params: SearchParams) -> None:
        """Store ``params`` as the index's defaults; they are written with the index by ``save``."""
        self._search_parameters(params)  # validates that they apply to this index type
        faiss = _faiss()
        for name, value in params.to_dict().items():
            if name == "k_factor":  # ParameterSpace's name for IndexRefine's (its "k_factor" is IVFPQR's)
                _refine_of(self._index).k_factor = float(value)
                continue
            faiss.ParameterSpace().set_index_parameter(self._index, name, value)
            if self._gpu is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, name, value)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored vectors for each query.

        ``k`` is clipped to the number of stored vectors. Approximate index types may still
        return fewer than ``k`` neighbours for a query; those slots hold id ``NO_ID`` (-1) and
        score ``-inf``-like values and must be dropped by the caller.

        Args:
            queries: ``(Q, dim)`` floating array (converted to float32).
            k: number of neighbours wanted, at least 1.
            params: per-call search parameters; None uses ``default_params``.

        Returns:
            ``(scores float32 (Q, k'), ids int64 (Q, k'))`` best first, with ``k' = min(k, ntotal)``.

        Raises:
            ValueError: bad queries or ``k``, or a parameter that does not apply to this index type.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._check_vectors(queries, "queries")
        faiss_params = self._search_parameters(params)
        k = min(int(k), self.ntotal)
        if k == 0 or queries.shape[0] == 0:
            return np.zeros((queries.shape[0], k), np.float32), np.full((queries.shape[0], k), NO_ID, np.int64)
        scores, ids = _numpy_method(self._searcher, "search")(queries, k, params=faiss_params)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    @property
    def supports_range_search(self) -> bool:
        """Whether FAISS implements range search for this index type on CPU (not for NSG, PQ fast-scan, shards ...).

        Refine indexes never use FAISS's: it would filter on the base index's approximate scores (or, over
        fast-scan, not run at all), not on the re-ranked ones ``search`` returns.
        """
        if self.is_refine:
            return False
        try:
            _numpy_method(self._index, "range_search")(np.zeros((0, self.dim), np.float32), 0.0)
        except RuntimeError:
            return False
        return True

    def range_search(
        self,
        queries: np.ndarray,
        threshold: float,
        params: SearchParams | None = None,
        *,
        method: Literal["auto", "native", "knn"] = "auto",
    ) -> RangeSearchResult:
        """All stored vectors scoring strictly above ``threshold`` for each query, best first.

        FAISS's range search is used where it exists (CPU Flat, IVF, HNSW, PQ, SQ ...); with a
        GPU replica it runs on the CPU copy, since FAISS's GPU indexes have none. Sharded indexes
        and a few CPU types (NSG, PQ fast-scan) lack it too; there a k-NN search is repeated with
        a doubling k until every query's k-th hit falls below the threshold (a warning is logged
        and ``fallback`` is set on the result). ``method="knn"`` forces that path, e.g. to keep a
        range query on the GPU.

        Args:
            queries: ``(Q, dim)`` floating array.
            threshold: cosine similarity hits must exceed.
            params: per-call search parameters, as for ``search``.
            method: "auto" (native where supported), "native" (error where not) or "knn" (always the fallback).

        Raises:
            ValueError: bad queries or parameters, or ``method="native"`` on an index without range search.
        """
        queries = self._check_vectors(queries, "queries")
        faiss_params = self._search_parameters(params)
        if method not in ("auto", "native", "knn"):
            raise ValueError(f"method must be 'auto', 'native' or 'knn', got {method!r}")
        native = method != "knn" and self.supports_range_search
        if method == "native" and not native:
            raise ValueError(f"{self!r} has no native range search")
        if native:
            search = _numpy_method(self._index, "range_search")
            lims, scores, ids = search(queries, float(threshold), params=faiss_params)
            return _sorted_range_result(lims, scores, ids, fallback=False)
        if method == "auto":
            logger.warning(
                "range search is not available for %s; using k-NN search with a growing k filtered at %.4f",
                self.factory,
                threshold,
            )
        return self._knn_range_search(queries, float(threshold), params)

    def _knn_range_search(
        self, queries: np.ndarray, threshold: float, params: SearchParams | None
    ) -> RangeSearchResult:
        cap = min(self.ntotal, _GPU_MAX_K) if self.on_gpu else self.ntotal
        hits: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, np.int64))] * len(queries)
        pending = np.arange(len(queries))
        k = min(_RANGE_FALLBACK_K, cap)
        truncated = 0
        while pending.size and k > 0:
            scores, ids = self.search(queries[pending], k, params)
            complete = (ids[:, -1] == NO_ID) | (scores[:, -1] <= threshold)
            exhausted = complete | (k >= cap)
            truncated += int((exhausted & ~complete).sum()) if cap < self.ntotal else 0
            for row in np.flatnonzero(exhausted):
                keep = (ids[row] != NO_ID) & (scores[row] > threshold)
                hits[pending[row]] = (scores[row][keep], ids[row][keep])
            pending = pending[~exhausted]
            k = min(2 * k, cap)
        if truncated:
            logger.warning("k-NN range search on GPU stops at k=%d: %d queries have more hits", cap, truncated)
        lims = np.zeros(len(queries) + 1, np.int64)
        lims[1:] = np.cumsum([len(s) for s, _ in hits])
        scores = np.concatenate([s for s, _ in hits]) if hits else np.zeros(0, np.float32)
        ids = np.concatenate([i for _, i in hits]) if hits else np.zeros(0, np.int64)
        return RangeSearchResult(lims, scores.astype(np.float32), ids.astype(np.int64), fallback=True)

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

        For refine indexes, the cheapest pair of that parameter and ``k_factor`` (see ``_tune_refine``).

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
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self.ntotal == 0:
            raise ValueError("cannot tune an empty index")
        exclude = None if query_ids is None else np.asarray(query_ids, dtype=np.int64).reshape(-1)
        if queries is None:
            all_ids = self.ids()
            rng = np.random.default_rng(seed)
            exclude = np.sort(rng.choice(all_ids, size=min(num_queries, all_ids.size), replace=False))
            queries = self.reconstruct(exclude)
        queries = self._check_vectors(queries, "queries")
        if exclude is not None and exclude.shape != (len(queries),):
            raise ValueError(f"query_ids must have shape ({len(queries)},), got {exclude.shape}")
        extra = 0 if exclude is None else 1
        k_eff = min(int(k), self.ntotal - extra)
        if k_eff < 1:
            raise ValueError("the index holds too few vectors to tune")
        truth = _drop_self(self._exact_knn(queries, k_eff + extra)[1], exclude, k_eff)
        means: dict[SearchParams, float] = {}

        def measure(params: SearchParams) -> float:  # the bound decides; the mean is what is reported
            _, found = self.search(queries, k_eff + extra, params)
            per_query = per_query_recall(_drop_self(found, exclude, k_eff), truth)
            means[params] = float(per_query.mean()) if per_query.size else 1.0
            return recall_lower_bound(per_query)

        knob = self._knob(k_eff + extra)
        if self.is_refine:
            params, recall = self._tune_refine(knob, measure, target_recall, k_eff)
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
                self.factory,
                k_eff,
                recall,
                bound,
                target_recall,
            )
        if apply and params.to_dict():
            self.set_default_params(params)
        return TuneResult(
            params,
            recall,
            float(target_recall),
            k_eff,
            reached,
            len(queries),
            held_out=exclude is None,
            lower_bound=bound,
        )

    def _tune_refine(
        self,
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
        base_cost, refine_cost = self._refine_costs(k)
        if knob is None:  # a flat base (e.g. "PQ32x4fs,RFlat"): only the re-ranking depth to choose
            return _smallest_passing(lambda v: SearchParams(k_factor=v), measure, 1, max(_K_FACTORS), target)
        name, low, high = knob
        best: tuple[float, SearchParams, float] | None = None
        last: tuple[SearchParams, float] | None = None
        for k_factor in sorted(_K_FACTORS, reverse=True):
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

    def _refine_costs(self, k: int) -> tuple[float, float]:
        """Bytes read per query per unit of the base parameter, and per unit of k_factor (``k`` re-ranked vectors).

        IVF: one nprobe scans ``ntotal / nlist`` codes of the base's code size; HNSW: one efSearch step
        visits about ``2 M`` neighbours' codes; re-ranking reads ``k`` refine-store vectors per unit of k_factor.
        """
        refine = _refine_of(self._index)
        base = _unwrap(self._index)
        ivf = _ivf_of(self._index)
        refine_cost = float(k * _faiss().downcast_index(refine.refine_index).sa_code_size())
        if ivf is not None:
            base_cost = max(self.ntotal / max(int(ivf.nlist), 1), 1.0) * max(int(ivf.code_size), 1)
        else:
            hnsw = _hnsw_of(self._index)
            links = int(hnsw.nb_neighbors(0)) if hnsw is not None else 1
            storage = _faiss().downcast_index(base.storage) if hnsw is not None else base
            base_cost = float(max(links, 1) * max(int(storage.sa_code_size()), 1))
        return base_cost, refine_cost

    def _knob(self, k: int) -> tuple[str, int, int] | None:
        """The tunable parameter of this index type, with its smallest and largest useful value for ``k``."""
        ivf = _ivf_of(self._index)
        if ivf is not None:
            high = min(int(ivf.nlist), _GPU_MAX_K) if self.on_gpu else int(ivf.nlist)
            return "nprobe", 1, high
        if _hnsw_of(self._index) is not None:
            return "ef_search", k, max(k, min(_MAX_EF_SEARCH, self.ntotal))  # FAISS searches max(efSearch, k)
        return None

    def _exact_knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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

        self._for_each_chunk(merge)
        return best_s, best_i

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the index (vectors, ids and default search parameters) to one file."""
        _faiss().write_index(self._index, str(path))

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
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read FAISS index {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2) and not _takes_ids_natively(index):
            raise ValueError(
                f"{path} holds a {type(index).__name__}, expected an id-mapped index (IndexIDMap2) or an IVF index"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} is not an inner-product index (metric type {index.metric_type})")
        _widen_coarse_search(index)  # files written before COARSE_EF_SEARCH keep FAISS's default of 16
        return cls._wrap(index, factory, device)

    # ------------------------------------------------------------------ internals

    @property
    def _searcher(self) -> Any:
        return self._gpu if self._gpu is not None else self._index

    def _to_gpu(self, index: Any) -> Any:
        """A GPU replica of ``index``, or None (logged) for types faiss-gpu does not support, like HNSW."""
        faiss = _faiss()
        if _hnsw_of(index) is not None:
            logger.info("%s stays on CPU: faiss-gpu has no HNSW index", self.factory)
            return None
        if _refine_of(index) is not None or _is_fast_scan(index):
            logger.info("%s stays on CPU: faiss-gpu has no refine or 4-bit fast-scan index", self.factory)
            return None
        try:
            replica = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
        except RuntimeError as exc:
            logger.info("%s stays on CPU: faiss-gpu cannot hold it (%s)", self.factory, str(exc).splitlines()[0])
            return None
        if not isinstance(_unwrap(replica), faiss.GpuIndex):  # the cloner copied it on the CPU instead
            logger.info("%s stays on CPU: faiss-gpu has no GPU version of it", self.factory)
            return None
        return replica

    def _search_parameters(self, params: SearchParams | None) -> Any:
        """FAISS ``SearchParameters`` for one call: thread-safe, unlike setting ``nprobe`` on the index."""
        if params is None or not params.to_dict():
            return None
        faiss = _faiss()
        ivf, hnsw, refine = _ivf_of(self._index), _hnsw_of(self._index), _refine_of(self._index)
        if params.nprobe is not None and ivf is None:
            raise ValueError(f"nprobe applies to IVF indexes; {self.factory!r} is not one")
        if params.ef_search is not None and hnsw is None:
            raise ValueError(f"ef_search applies to HNSW indexes; {self.factory!r} is not one")
        if params.k_factor is not None and refine is None:
            raise ValueError(
                f"k_factor applies to refine indexes (...,RFlat / ...,Refine(...)); {self.factory!r} is not one"
            )
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

    @contextmanager
    def _direct_map(self) -> Iterator[None]:
        """Let an IVF index look vectors up by id for the duration (a hash table for native ids)."""
        faiss = _faiss()
        ivf = _ivf_of(self._index)
        if ivf is None or ivf.direct_map.type != faiss.DirectMap.NoMap or _refine_of(self._index) is not None:
            yield  # refine indexes reconstruct from their refine store, by position, through the id map
            return
        kind = faiss.DirectMap.Hashtable if self.native_ids else faiss.DirectMap.Array
        with self._lock:
            ivf.set_direct_map_type(kind)
            try:
                yield
            finally:
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)

    def _for_each_chunk(self, consume: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Call ``consume(ids, vectors)`` on successive chunks of the stored vectors, in ``ids()`` order."""
        ids = self.ids()
        faiss = _faiss()
        with self._direct_map():
            for start in range(0, ids.size, _CHUNK):
                chunk_ids = ids[start : start + _CHUNK]
                if isinstance(self._index, faiss.IndexIDMap):
                    chunk = self._index.index.reconstruct_n(start, chunk_ids.size)
                else:
                    chunk = self._index.reconstruct_batch(np.ascontiguousarray(chunk_ids))
                consume(chunk_ids, np.asarray(chunk, dtype=np.float32))

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


def _two_level_kmeans(vectors: np.ndarray, nlist: int, *, spherical: bool, seed: int) -> np.ndarray:
    """``nlist`` k-means centroids in two levels: ~sqrt(nlist) groups, then each group's share of the lists.

    Each group gets lists in proportion to its size (at least one, and no more than its points), so the
    final lists are balanced like a flat k-means's; the cost is about 2 sqrt(nlist) instead of nlist
    distance computations per point and iteration.
    """
    faiss = _faiss()
    d = vectors.shape[1]
    groups = min(max(2, round(nlist**0.5)), len(vectors))
    top = faiss.Kmeans(d, groups, niter=_TWO_LEVEL_NITER, spherical=spherical, seed=seed, max_points_per_centroid=2048)
    top.train(vectors)
    assign = top.index.search(vectors, 1)[1].ravel()
    sizes = np.bincount(assign, minlength=groups)
    shares = np.maximum(np.floor(sizes / sizes.sum() * nlist).astype(int), (sizes > 0).astype(int))
    shares = np.minimum(shares, sizes)
    for group in np.argsort(-sizes):  # hand out the rounding remainder to the largest groups
        if shares.sum() >= nlist:
            break
        shares[group] += min(nlist - shares.sum(), sizes[group] - shares[group])
    parts = []
    for group in np.flatnonzero(shares):
        members = np.ascontiguousarray(vectors[assign == group])
        if shares[group] == len(members):
            parts.append(members)
            continue
        sub = faiss.Kmeans(
            d, int(shares[group]), niter=_TWO_LEVEL_NITER, spherical=spherical, seed=int(seed + 1 + group)
        )
        sub.train(members)
        parts.append(sub.centroids)
    centroids = np.ascontiguousarray(np.concatenate(parts)[:nlist], dtype=np.float32)
    if len(centroids) < nlist:
        raise RuntimeError(f"two-level k-means found {len(centroids)} of {nlist} lists: too few training vectors")
    return centroids


def _layers(index: Any) -> Iterator[Any]:
    """The index and every wrapper below it (id map, pre-transform, refine's base), outermost first, downcast."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    while True:
        yield index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return


def _unwrap(index: Any) -> Any:
    """The searching index under id maps, pre-transforms (OPQ, PCA) and refine wrappers, as its concrete type.

    For a refine index this is the base index (IVF or HNSW) whose nprobe / efSearch ``tune`` sets.
    """
    *_, inner = _layers(index)
    return inner


def _refine_of(index: Any) -> Any:
    """The ``IndexRefine`` (or ``IndexRefineFlat``) inside ``index``, or None."""
    faiss = _faiss()
    return next((layer for layer in _layers(index) if isinstance(layer, faiss.IndexRefine)), None)


def _has_pretransform(index: Any) -> bool:
    faiss = _faiss()
    return any(isinstance(layer, faiss.IndexPreTransform) for layer in _layers(index))


def _is_fast_scan(index: Any) -> bool:
    """4-bit PQ fast-scan ("PQ64x4fs"): packed codes scanned with SIMD lookups; CPU only."""
    faiss = _faiss()
    return isinstance(_unwrap(index), (faiss.IndexIVFFastScan, faiss.IndexFastScan))


def _widen_coarse_search(index: Any) -> None:
    """Search an IVF index's HNSW coarse quantiser at least ``COARSE_EF_SEARCH`` wide (see there why)."""
    faiss = _faiss()
    coarse = _ivf_of(index)
    quantizer = None if coarse is None else faiss.downcast_index(coarse.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW) and quantizer.hnsw.efSearch < COARSE_EF_SEARCH:
        quantizer.hnsw.efSearch = COARSE_EF_SEARCH


def _takes_ids_natively(index: Any) -> bool:
    """IVF indexes, bare or behind a pre-transform, store ids in their lists; IndexRefine etc. do not."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


def _ivf_of(index: Any) -> Any:
    inner = _unwrap(index)
    return inner if isinstance(inner, _faiss().IndexIVF) else None


def _hnsw_of(index: Any) -> Any:
    inner = _unwrap(index)
    return inner.hnsw if isinstance(inner, _faiss().IndexHNSW) else None


def _sorted_range_result(lims: np.ndarray, scores: np.ndarray, ids: np.ndarray, fallback: bool) -> RangeSearchResult:
    """FAISS returns range hits unordered; sort each query's hits by descending score (ties by id)."""
    lims = np.asarray(lims, dtype=np.int64)
    scores, ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
    query = np.repeat(np.arange(lims.size - 1), np.diff(lims))
    order = np.lexsort((ids, -scores, query))
    return RangeSearchResult(lims, scores[order], ids[order], fallback=fallback)


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
