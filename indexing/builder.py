"""Build an index directory from an encoder checkpoint and a gallery, in one call or from shards.

This is the whole offline half of the engine: embed the gallery (skipping unreadable files) into
resumable chunk files (``indexing.embedding_store``), put the vectors in a FAISS index under the
gallery positions as ids, store each item's path, labels and metadata, and write it all atomically
with a manifest naming the encoder that built it. ``merge_shards`` does the second half for the
chunk directories of several ``--shard I/N`` runs.

The index type is given or chosen (``factory="auto"``: ``choose_factory`` from the vector count
and the memory budget, by default half the machine's RAM; Flat below 50k vectors); an approximate
index then has its search parameters (nprobe or efSearch, and k_factor for refine indexes) tuned to
a target recall, with a sample of the gallery held out of the index as queries until tuning is done,
and the choice, its reason, the tuned parameters and the recall measured go into the manifest.

With ``whiten``, a descriptor whitening (``indexing.whitening``: "pca", "learned") is fitted after the
extraction, on the gallery's own embeddings (and, for "learned", its finest label level) or on a separate
labelled file (``whiten_images``, embedded with the same encoder); the index then stores the whitened
vectors and carries the whitening, which every query goes through. ``merge_shards`` fits it at merge
time, on the merged gallery, so sharded and single-run builds give the same index.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from indexing.embedding_store import (
    DEFAULT_CHUNK_SIZE,
    EmbeddingStore,
    ExtractionSpec,
    StoredEmbeddings,
    combine_stores,
)
from indexing.errors import IndexFormatError
from indexing.extract import StoreRun, extract_embeddings
from indexing.extract_job import ExtractOptions, Runtime, default_work_dir, extract_gallery
from indexing.faiss_index import FaissIndex
from indexing.index_choice import (
    AUTO_FACTORY,
    TUNE_QUERIES,
    BuiltIndex,
    check_index_options,
    check_some_readable,
    check_target_recall,
    log_tuning,
    resolve_factory,
)
from indexing.index_dir import check_replaceable, write_index_dir
from indexing.manifest import HistoryEntry, Manifest
from indexing.metadata import MetadataRow
from indexing.streaming_merge import open_shards, stream_backend_index, stream_index
from indexing.vector_index import DEFAULT_BACKEND, backend_class
from indexing.whitening import WHITENING_METHODS, Whitening, fit_whitening
from models.checkpoint import load_encoder
from models.encoder import Encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.gallery import Gallery, as_gallery, open_gallery
from retrieval.data.images import SkipReport

__all__ = [
    "AUTO_FACTORY",
    "BuildSummary",
    "BuiltIndex",
    "WhitenPlan",
    "build_index",
    "check_index_options",
    "index_embeddings",
    "make_index",
    "merge_shards",
    "plan_whitening",
]

#: What runs a build's extraction: this process's pipeline, or Ray Data over a Ray cluster.
Engine = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSummary:
    """What ``build_index`` did.

    Attributes:
        count: items indexed.
        skipped: gallery files left out as unreadable (also written to ``skipped.tsv`` in the index).
        seconds: wall-clock time of the whole build.
        out_path: the index directory.
        encoder_id: id of the encoder that built it.
        factory: the FAISS factory string of the index (the choice, for ``factory="auto"``).
        factory_reason: why that factory (as recorded in the manifest).
        search_params: tuned search parameters stored as the index's defaults (FAISS names), or None.
        tuning: the tuning outcome (target and measured recall, k, queries), or None for exact search.
        images: items in the gallery (indexed + skipped).
        extraction: what this run's extraction did (chunks resumed, images/s), or None for a merge.
        whitening: the whitening the stored vectors went through (``Whitening.describe()`` plus the matching
            ``pairs`` of a learned one), or None.
    """

    count: int
    skipped: SkipReport
    seconds: float
    out_path: Path
    encoder_id: str
    factory: str = "Flat"
    factory_reason: str | None = None
    search_params: dict[str, int] | None = None
    tuning: dict[str, Any] | None = None
    images: int = 0
    extraction: StoreRun | None = None
    whitening: dict[str, Any] | None = None


@dataclass(frozen=True)
class WhitenPlan:
    """A whitening to fit when the index is written, checked before the (long) extraction.

    Attributes:
        method: a registered whitening method ("pca", "learned").
        dim: directions to keep, or None for every non-degenerate one.
        images: a separate gallery (CSV, folder or list) to fit on, embedded with the index's encoder; None
            fits on the indexed gallery itself.
        level: the label level whose classes define matching pairs (the fitting set's finest), for methods
            that need labels; None otherwise.
    """

    method: str
    dim: int | None = None
    images: Gallery | None = None
    level: str | None = None


def plan_whitening(
    method: str | None,
    dim: int | None = None,
    images: str | Path | None = None,
    gallery_levels: tuple[str, ...] | list[str] = (),
) -> WhitenPlan | None:
    """Check the whitening options against the gallery before anything is embedded; None for no whitening.

    Raises:
        ConfigError: ``dim`` or ``images`` without a method, a non-positive ``dim``, or a method that needs
            labels for a fitting set that has none.
        retrieval.registry.UnknownNameError: an unknown method (the message lists the valid ones).
        DatasetError: ``images`` cannot be opened.
    """
    if method is None:
        if dim is not None or images is not None:
            raise ConfigError("--whiten-dim and --whiten-images only apply with --whiten pca|learned")
        return None
    entry = WHITENING_METHODS.get(method)
    if dim is not None and (isinstance(dim, bool) or int(dim) < 1):
        raise ConfigError(f"--whiten-dim must be a positive integer, got {dim}")
    fit_gallery = open_gallery(images) if images is not None else None
    levels = list(fit_gallery.levels if fit_gallery is not None else gallery_levels)
    level = None
    if entry.needs_labels:
        if not levels:
            where = f"--whiten-images {images}" if images is not None else "the gallery"
            raise ConfigError(
                f"--whiten {method} learns from pairs of images of the same class, but {where} carries no labels; "
                "give a labelled CSV (a 'fine' column) as the gallery or as --whiten-images, or use --whiten pca"
            )
        level = levels[0]
    return WhitenPlan(method, None if dim is None else int(dim), fit_gallery, level)


def make_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str = AUTO_FACTORY,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    *,
    num_tune_queries: int = TUNE_QUERIES,
    tune_queries: np.ndarray | None = None,
    seed: int = 0,
    backend: str = DEFAULT_BACKEND,
    backend_options: Mapping[str, Any] | None = None,
    labels: Sequence[Mapping[str, str]] | None = None,
) -> BuiltIndex:
    """Choose (for "auto"), train, fill and tune a vector index over L2-normalised ``vectors`` with ``ids``.

    FAISS (the default ``backend``) is chosen, trained and tuned as below. Another backend (``"qdrant"``)
    is created from ``backend_options`` and filled with the vectors and ``labels``; it chooses and tunes its
    own structure, so ``factory`` must be "auto" (or the backend's own name) and nothing is tuned here.

    With "auto" and no ``memory_budget``, the budget is ``default_memory_budget()`` (half the RAM),
    and the reason recorded in the manifest says so.

    Tuning queries are held out: a seeded sample of the gallery is added only after tuning, so the
    queries are truly absent from the index they are searched in, as real queries are (tuning on
    stored items with themselves left out lands a little under the target on real queries). Their
    original embeddings are used, not decoded codes, which would sit too close to their IVF centroid
    and under-estimate nprobe. ``tune_queries`` replaces that sample with explicit queries.

    Args:
        vectors: ``(N, dim)`` unit vectors.
        ids: ``(N,)`` int64 ids.
        factory: a ``faiss.index_factory`` string, or "auto" for ``choose_factory``.
        memory_budget: bytes (or text like "2GB") the index may use; only with "auto".
        target_recall: recall@10 the tuned search parameters must reach, in (0, 1].
        num_tune_queries: gallery embeddings held out as tuning queries (at most half the gallery).
        tune_queries: ``(Q, dim)`` unit vectors to tune with instead (e.g. real query embeddings).
        seed: seeds the training and query samples.
        backend: a registered vector backend (``indexing.vector_index.VECTOR_BACKENDS``).
        backend_options: the backend's options (Qdrant: ``url``, ``collection``); none for FAISS.
        labels: each vector's labels by level, kept by backends that filter on labels themselves.

    Raises:
        ConfigError: a bad factory, budget or target, a budget too small for any index, or too few
            vectors to train the index.
    """
    vectors = np.asarray(vectors)
    ids = np.asarray(ids)
    if backend != DEFAULT_BACKEND:
        return _make_backend_index(vectors, ids, factory, memory_budget, backend, backend_options or {}, labels)
    if backend_options:
        raise ConfigError(f"the faiss backend takes no backend options, got {sorted(backend_options)}")
    check_target_recall(target_recall)
    factory, reason = resolve_factory(factory, memory_budget, len(vectors), vectors.shape[1])
    logger.info("index type %s (%s)", factory, reason)
    index = FaissIndex(vectors.shape[1], factory)
    index.train(vectors, seed=seed)
    tuning = None
    if factory == "Flat" or len(vectors) < 2:
        index.add(vectors, ids)
    elif tune_queries is not None:
        index.add(vectors, ids)
        tuning = index.tune(tune_queries, target_recall, seed=seed)
    else:
        held = np.zeros(len(vectors), bool)
        rng = np.random.default_rng(seed)
        held[rng.choice(len(vectors), size=max(1, min(num_tune_queries, len(vectors) // 2)), replace=False)] = True
        index.add(vectors[~held], ids[~held])
        tuning = index.tune(vectors[held], target_recall, seed=seed)
        index.add(vectors[held], ids[held])
    if tuning is not None:
        log_tuning(factory, tuning)
    return BuiltIndex(index, factory, reason, tuning)


def _make_backend_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    memory_budget: int | str | None,
    backend: str,
    options: Mapping[str, Any],
    labels: Sequence[Mapping[str, str]] | None,
) -> BuiltIndex:
    """``make_index`` for a backend that builds its own structure (a Qdrant collection)."""
    kind = backend_class(backend)
    if memory_budget is not None:
        raise ConfigError(f"--memory-budget sizes FAISS indexes; the {backend} backend sizes its own")
    index = kind.create(vectors.shape[1], factory, options)
    try:
        index.add(vectors, ids, labels=labels)
    except BaseException:
        index.discard()
        raise
    return BuiltIndex(index, index.factory, f"{backend} backend (it chooses and tunes its own index)", None)


def build_index(
    encoder_path: str | Path,
    dataset: LabelledImageDataset | Gallery,
    out_path: str | Path,
    factory: str = AUTO_FACTORY,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    work_dir: str | Path | None = None,
    restart: bool = False,
    keep_embeddings: bool = False,
    amp: bool = True,
    whiten: str | None = None,
    whiten_dim: int | None = None,
    whiten_images: str | Path | None = None,
    runtime: Runtime = "torch",
    backend: str = DEFAULT_BACKEND,
    backend_options: Mapping[str, Any] | None = None,
    engine: Engine = "local",
    actors: int | None = None,
) -> BuildSummary:
    """Embed ``dataset`` with the encoder checkpoint and write an index directory at ``out_path``.

    Embeddings go to chunk files in ``work_dir`` as they are produced, so an interrupted build
    continues where it stopped when run again with the same arguments, and yields the same index.
    Item ids are the gallery positions, so ``dataset.names[id]`` is the image of a hit. The
    checkpoint's absolute path is recorded in the manifest as the default query encoder. A
    previous index at ``out_path`` is replaced only once the new one is complete.

    Args:
        encoder_path: an encoder checkpoint directory (``models.save_encoder``).
        dataset: the gallery (a ``Gallery`` or a labelled dataset); labels and metadata are stored per item.
        out_path: the index directory to create or replace.
        factory: ``faiss.index_factory`` string ("Flat" is exact search), or "auto" (the default):
            ``choose_factory`` picks from the gallery size and ``memory_budget``; Flat below 50k images.
        batch_size: images per forward pass.
        device: where the encoder runs.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.
        memory_budget: bytes, or text like "2GB", the index may take; only with ``factory="auto"``; None: half
            the machine's RAM (``indexing.index_factory.default_memory_budget``).
        target_recall: recall@10 an approximate index's search parameters are tuned to.
        chunk_size: gallery positions per chunk file.
        work_dir: the extraction directory; default ``OUT.extract`` beside the index.
        restart: discard a ``work_dir`` left by a different job (other encoder, gallery or batch size).
        keep_embeddings: keep ``work_dir`` after success (otherwise it is removed).
        amp: float16 autocast when extracting on CUDA.
        whiten: fit this whitening method ("pca", "learned") and store whitened vectors (see the module
            docstring); None stores the encoder's vectors as they are.
        whiten_dim: whitened dimension (default: every direction the fitting vectors span, at most D).
        whiten_images: fit on this labelled gallery instead of the indexed one (e.g. a validation set).
        runtime: what runs the encoder: "torch", "onnx" (exported, run by ONNX Runtime on CPU) or "auto"
            (``indexing.extract_job.choose_runtime``).
        backend: where the vectors go: "faiss" (``index.faiss`` in the directory) or "qdrant" (a collection).
        backend_options: the backend's options (Qdrant: ``url``, ``collection``).
        engine: what runs the extraction: "local" (this process) or "ray" (Ray Data, an actor pool over the
            Ray cluster ``ray.init`` reaches; ``indexing.ray_extract``). Both write the same chunk files.
        actors: encoder actors of the Ray engine (default: one per GPU, else one per CPU core).

    Raises:
        ConfigError: a bad factory string, memory budget, target recall or whitening option.
        indexing.whitening.WhiteningError: the whitening cannot be fitted (too few vectors, no matching
            pairs, a dimension beyond what the vectors span).
        models.CheckpointError: ``encoder_path`` is not a valid checkpoint.
        DatasetError: the gallery is empty or none of its images could be read.
        IndexFormatError: ``out_path`` exists and is not an index directory.
        ExtractionMismatchError: ``work_dir`` holds another job's chunks (without ``restart``).
    """
    start = time.perf_counter()
    gallery = as_gallery(dataset)
    options = ExtractOptions(batch_size, chunk_size, device, num_workers, amp, progress, restart, runtime)
    check_replaceable(Path(out_path))  # fail before the expensive extraction, not after it
    check_index_options(factory, memory_budget, target_recall, backend)
    check_engine(engine)
    plan = plan_whitening(whiten, whiten_dim, whiten_images, gallery.levels)
    encoder = load_encoder(encoder_path, device=device)
    if factory != AUTO_FACTORY and backend == DEFAULT_BACKEND:  # a bad factory fails here too (whitened size)
        FaissIndex((plan.dim if plan else None) or encoder.embedding_dim, factory, device="cpu")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_path)
    if engine == "ray":
        from indexing.ray_extract import extract_gallery_ray

        store, run = extract_gallery_ray(encoder, encoder_path, gallery, work_dir, options, num_actors=actors)
    else:
        store, run = extract_gallery(encoder, encoder_path, gallery, work_dir, options)
    stored = combine_stores([store])
    whitening = fit_planned_whitening(plan, stored, encoder, options) if plan else None
    summary = index_embeddings(
        stored,
        out_path,
        factory,
        memory_budget,
        target_recall,
        encoder_path=encoder_path,
        action="build",
        start=start,
        run=run,
        whitening=whitening,
        backend=backend,
        backend_options=backend_options,
    )
    if not keep_embeddings:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary


def merge_shards(
    shard_dirs: list[str | Path],
    out_path: str | Path,
    factory: str = AUTO_FACTORY,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    *,
    encoder_path: str | Path | None = None,
    whiten: str | None = None,
    whiten_dim: int | None = None,
    whiten_images: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    backend: str = DEFAULT_BACKEND,
    backend_options: Mapping[str, Any] | None = None,
) -> BuildSummary:
    """Build one index from the extraction directories of ``index build --shard I/N`` runs.

    The shards must come from the same encoder, gallery and chunk size and cover every chunk once;
    the index is then the one a single run would build. A whitening is fitted here, at merge time, on the
    merged gallery (the shards alone each see a part of it), exactly as a single build would fit it.

    Args:
        shard_dirs: the shard directories, in any order.
        out_path: the index directory to create or replace.
        factory, memory_budget, target_recall: as for :func:`build_index`.
        encoder_path: recorded as the default query encoder; default: the path the shards were embedded with.
        whiten, whiten_dim, whiten_images: as for :func:`build_index`; ``whiten_images`` is embedded with
            ``encoder_path`` (which must then be the shards' encoder) on ``device``.
        progress: progress bars while streaming the shards into the index and while embedding ``whiten_images``.
        backend, backend_options: as for :func:`build_index`.

    Raises:
        ExtractionMismatchError: shards of different jobs, overlapping, missing or unfinished.
    """
    start = time.perf_counter()
    check_replaceable(Path(out_path))
    check_index_options(factory, memory_budget, target_recall, backend)
    stores = [EmbeddingStore.open(path) for path in shard_dirs]
    plan = plan_whitening(whiten, whiten_dim, whiten_images, stores[0].spec.levels if stores else ())
    if plan is None:  # stream the chunk files: never every vector at once
        shard_set = open_shards(shard_dirs)
        if backend == DEFAULT_BACKEND:
            built = stream_index(shard_set, factory, memory_budget, target_recall, progress=progress)
        else:
            built = stream_backend_index(shard_set, factory, backend, backend_options or {}, progress=progress)
        return write_built_index(
            built,
            shard_set.spec,
            shard_set.skipped,
            shard_set.metadata_rows(),
            out_path,
            encoder_path=encoder_path or shard_set.spec.encoder_path,
            action="merge",
            start=start,
            shards=len(stores),
        )
    stored = combine_stores(stores)
    whitening = None
    if plan is not None:
        encoder = None
        if plan.images is not None:
            encoder = _shards_encoder(encoder_path or stored.spec.encoder_path, stored.spec.encoder_id, device)
        options = ExtractOptions(device=device, progress=progress)
        whitening = fit_planned_whitening(plan, stored, encoder, options)
    return index_embeddings(
        stored,
        out_path,
        factory,
        memory_budget,
        target_recall,
        encoder_path=encoder_path or stored.spec.encoder_path,
        action="merge",
        start=start,
        shards=len(stores),
        whitening=whitening,
        backend=backend,
        backend_options=backend_options,
    )


def _shards_encoder(encoder_path: str | Path | None, encoder_id: str, device: str | torch.device) -> Encoder:
    """The shards' encoder, to embed ``--whiten-images`` in their space."""
    if encoder_path is None:
        raise ConfigError("the shards record no encoder; pass --encoder to embed --whiten-images")
    encoder = load_encoder(encoder_path, device=device)
    if str(encoder.encoder_id) != encoder_id:
        raise IndexFormatError(
            f"encoder {encoder_path} (id {encoder.encoder_id}) did not embed these shards (id {encoder_id}); "
            "--whiten-images must be embedded by the same encoder"
        )
    return encoder


def fit_planned_whitening(
    plan: WhitenPlan, stored: StoredEmbeddings, encoder: Encoder | None, options: ExtractOptions
) -> Whitening:
    """Fit ``plan`` on the gallery's stored embeddings, or on ``plan.images`` embedded by ``encoder``.

    Raises:
        indexing.whitening.WhiteningError: the fit failed (too few vectors, no matching pairs, ``dim`` too large).
        DatasetError: none of ``plan.images`` could be read.
    """
    if plan.images is None:
        vectors = stored.embeddings
        labels = [row.get("labels", {}).get(plan.level) for row in stored.rows] if plan.level else None
        fitted_on = f"gallery {stored.spec.gallery_source}"
    else:
        if encoder is None:
            raise ConfigError("fitting a whitening on separate images needs the encoder that embeds them")
        extraction = extract_embeddings(
            encoder,
            plan.images,
            batch_size=options.batch_size,
            device=options.device,
            num_workers=options.num_workers,
            progress=options.progress,
            amp=options.amp,
        )
        if len(extraction) == 0:
            raise DatasetError(f"none of the {len(plan.images)} --whiten-images could be read")
        vectors = extraction.embeddings
        rows = extraction.indices.tolist()
        labels = [plan.images.labels_of(i).get(plan.level) for i in rows] if plan.level else None
        fitted_on = f"images {plan.images.source}"
    label_array = None if labels is None else np.array(labels, dtype=object)
    whitening = fit_whitening(plan.method, vectors, label_array, plan.dim, fitted_on=fitted_on)
    logger.info("whitening %s fitted on %s: %d -> %d dims", plan.method, fitted_on, whitening.dim_in, whitening.dim_out)
    return whitening


def index_embeddings(
    stored: StoredEmbeddings,
    out_path: str | Path,
    factory: str,
    memory_budget: int | str | None,
    target_recall: float,
    *,
    encoder_path: str | Path | None,
    action: str,
    start: float,
    run: StoreRun | None = None,
    shards: int = 1,
    whitening: Whitening | None = None,
    backend: str = DEFAULT_BACKEND,
    backend_options: Mapping[str, Any] | None = None,
) -> BuildSummary:
    """Choose, train, fill and tune the index over stored embeddings (whitened first, with ``whitening``) and write
    the index directory (with the whitening file)."""
    spec = stored.spec
    check_some_readable(len(stored), stored.skipped, spec.gallery_count)
    vectors = stored.embeddings if whitening is None else whitening.apply(stored.embeddings)
    rows = stored.metadata_rows()
    built = make_index(
        vectors,
        stored.positions,
        factory,
        memory_budget,
        target_recall,
        backend=backend,
        backend_options=backend_options,
        labels=[row.labels for row in rows],
    )
    return write_built_index(
        built,
        spec,
        stored.skipped,
        rows,
        out_path,
        encoder_path=encoder_path,
        action=action,
        start=start,
        run=run,
        shards=shards,
        whitening=whitening,
    )


def write_built_index(
    built: BuiltIndex,
    spec: ExtractionSpec,
    skipped: SkipReport,
    rows: Iterable[MetadataRow],
    out_path: str | Path,
    *,
    encoder_path: str | Path | None,
    action: str,
    start: float,
    run: StoreRun | None = None,
    shards: int = 1,
    whitening: Whitening | None = None,
) -> BuildSummary:
    """Write the index directory of a built index: manifest with its history, metadata ``rows`` (consumed lazily)."""
    index, fields = built.index, built.manifest_fields()
    history = HistoryEntry(
        action=action,
        source=spec.gallery_source,
        images=spec.gallery_count,
        added=index.ntotal,
        skipped=len(skipped),
        shards=shards,
    )
    manifest = Manifest(
        dim=index.dim,
        count=index.ntotal,
        encoder_id=spec.encoder_id,
        encoder_path=str(Path(encoder_path).resolve()) if encoder_path is not None else None,
        levels=list(spec.levels),
        skipped=len(skipped),
        history=[history.to_dict()],
        backend=index.backend,
        **fields,
    )
    write_index_dir(out_path, index, rows, manifest, skipped=skipped, whitening=whitening)
    seconds = time.perf_counter() - start
    logger.info("indexed %d images (%d skipped) into %s in %.1fs", index.ntotal, len(skipped), out_path, seconds)
    return BuildSummary(
        count=index.ntotal,
        skipped=skipped,
        seconds=seconds,
        out_path=Path(out_path),
        encoder_id=spec.encoder_id,
        images=spec.gallery_count,
        extraction=run,
        whitening=_whitening_summary(whitening),
        **fields,
    )


def _whitening_summary(whitening: Whitening | None) -> dict[str, Any] | None:
    if whitening is None:
        return None
    pairs = whitening.details.get("pairs")
    return {**whitening.describe(), **({"pairs": pairs} if pairs is not None else {})}


def check_engine(engine: str) -> None:
    """``engine`` is one of ``ENGINES``."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown extraction engine {engine!r}; valid: {', '.join(ENGINES)}")
