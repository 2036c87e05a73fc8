"""Build an index directory from an encoder checkpoint and a gallery, in one call or from shards.

This is the whole offline half of the engine: embed the gallery (skipping unreadable files) into
resumable chunk files (``indexing.embedding_store``), put the vectors in a FAISS index under the
gallery positions as ids, store each item's path, labels and metadata, and write it all atomically
with a manifest naming the encoder that built it. ``merge_shards`` does the second half for the
chunk directories of several ``--shard I/N`` runs.

The index type is given or chosen (``factory="auto"``: ``choose_factory`` from the vector count
and an optional memory budget, Flat below 50k vectors); an approximate index then has its
search parameter (nprobe, efSearch) tuned to a target recall, using the original embeddings of a
sample of the gallery as queries, and the choice, its reason and the tuned parameters go into
the manifest.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexing.embedding_store import DEFAULT_CHUNK_SIZE, EmbeddingStore, StoredEmbeddings, combine_stores
from indexing.extract import StoreRun
from indexing.extract_job import ExtractOptions, default_work_dir, extract_gallery
from indexing.faiss_index import FaissIndex, TuneResult
from indexing.index_dir import check_replaceable, write_index_dir
from indexing.index_factory import choose_factory, parse_size
from indexing.manifest import HistoryEntry, Manifest
from models.checkpoint import load_encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.gallery import Gallery, as_gallery
from retrieval.data.images import SkipReport

__all__ = [
    "AUTO_FACTORY",
    "BuildSummary",
    "BuiltIndex",
    "build_index",
    "check_index_options",
    "index_embeddings",
    "make_index",
    "merge_shards",
]

#: ``factory`` value that lets ``choose_factory`` pick the index type from the gallery size and memory budget.
AUTO_FACTORY = "auto"
#: Gallery embeddings used as queries when tuning an approximate index.
TUNE_QUERIES = 500

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


@dataclass(frozen=True)
class BuiltIndex:
    """A filled index, the factory it was made with and why, and how it was tuned.

    Attributes:
        index: trained, filled and (when approximate) tuned; its default search parameters are the tuned ones.
        factory: the factory string used.
        reason: why: ``choose_factory``'s explanation for "auto", otherwise that it was given.
        tuning: ``FaissIndex.tune``'s result, or None for exact search (Flat) or a single vector.
    """

    index: FaissIndex
    factory: str
    reason: str
    tuning: TuneResult | None

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest fields describing this index: factory, factory_reason, search_params, tuning."""
        tuning = None
        if self.tuning is not None:
            tuning = {key: value for key, value in asdict(self.tuning).items() if key != "params"}
        params = self.tuning.params.to_dict() if self.tuning is not None else {}
        return {
            "factory": self.factory,
            "factory_reason": self.reason,
            "search_params": params or None,
            "tuning": tuning,
        }


def make_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str = AUTO_FACTORY,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    *,
    num_tune_queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> BuiltIndex:
    """Choose (for "auto"), train, fill and tune a FAISS index over L2-normalised ``vectors`` with ``ids``.

    Tuning queries are the original embeddings of a seeded sample of the gallery, each left out of
    its own results: decoded PQ/SQ vectors would sit too close to their IVF centroid and
    under-estimate nprobe (see ``FaissIndex.tune``).

    Args:
        vectors: ``(N, dim)`` unit vectors.
        ids: ``(N,)`` int64 ids.
        factory: a ``faiss.index_factory`` string, or "auto" for ``choose_factory``.
        memory_budget: bytes (or text like "2GB") the index may use; only with "auto".
        target_recall: recall@10 the tuned search parameters must reach, in (0, 1].
        num_tune_queries: gallery embeddings used as tuning queries.
        seed: seeds the training and query samples.

    Raises:
        ConfigError: a bad factory, budget or target, a budget too small for any index, or too few
            vectors to train the index.
    """
    vectors = np.asarray(vectors)
    budget = _budget(memory_budget, factory)
    _check_target(target_recall)
    if factory == AUTO_FACTORY:
        try:
            choice = choose_factory(len(vectors), vectors.shape[1], budget)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        factory, reason = choice.factory, f"auto: {choice.reason}"
    else:
        reason = "given explicitly (not chosen automatically)"
    logger.info("index type %s (%s)", factory, reason)
    index = FaissIndex(vectors.shape[1], factory)
    index.train(vectors, seed=seed)
    index.add(vectors, ids)
    tuning = None
    if factory != "Flat" and len(vectors) > 1:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(vectors), size=min(num_tune_queries, len(vectors)), replace=False))
        tuning = index.tune(vectors[rows], target_recall, query_ids=np.asarray(ids)[rows], seed=seed)
        logger.info("tuned %s: %s, recall@%d %.3f", factory, tuning.params.to_dict(), tuning.k, tuning.recall)
    return BuiltIndex(index, factory, reason, tuning)


def _budget(memory_budget: int | str | None, factory: str) -> int | None:
    if memory_budget is None:
        return None
    if factory != AUTO_FACTORY:
        raise ConfigError(f"a memory budget only applies to factory 'auto', not to the given factory {factory!r}")
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    if budget <= 0:
        raise ConfigError(f"memory budget must be positive, got {memory_budget!r}")
    return budget


def _check_target(target_recall: float) -> None:
    if not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")


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
        memory_budget: bytes, or text like "2GB", the index may take; only with ``factory="auto"``.
        target_recall: recall@10 an approximate index's search parameters are tuned to.
        chunk_size: gallery positions per chunk file.
        work_dir: the extraction directory; default ``OUT.extract`` beside the index.
        restart: discard a ``work_dir`` left by a different job (other encoder, gallery or batch size).
        keep_embeddings: keep ``work_dir`` after success (otherwise it is removed).
        amp: float16 autocast when extracting on CUDA.

    Raises:
        ConfigError: a bad factory string, memory budget or target recall.
        models.CheckpointError: ``encoder_path`` is not a valid checkpoint.
        DatasetError: the gallery is empty or none of its images could be read.
        IndexFormatError: ``out_path`` exists and is not an index directory.
        ExtractionMismatchError: ``work_dir`` holds another job's chunks (without ``restart``).
    """
    start = time.perf_counter()
    gallery = as_gallery(dataset)
    options = ExtractOptions(batch_size, chunk_size, device, num_workers, amp, progress, restart)
    check_replaceable(Path(out_path))  # fail before the expensive extraction, not after it
    check_index_options(factory, memory_budget, target_recall)
    encoder = load_encoder(encoder_path, device=device)
    if factory != AUTO_FACTORY:
        FaissIndex(encoder.embedding_dim, factory, device="cpu")  # a bad factory string fails here too
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_path)
    store, run = extract_gallery(encoder, encoder_path, gallery, work_dir, options)
    summary = index_embeddings(
        combine_stores([store]),
        out_path,
        factory,
        memory_budget,
        target_recall,
        encoder_path=encoder_path,
        action="build",
        start=start,
        run=run,
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
) -> BuildSummary:
    """Build one index from the extraction directories of ``index build --shard I/N`` runs.

    The shards must come from the same encoder, gallery and chunk size and cover every chunk once;
    the index is then the one a single run would build.

    Args:
        shard_dirs: the shard directories, in any order.
        out_path: the index directory to create or replace.
        factory, memory_budget, target_recall: as for :func:`build_index`.
        encoder_path: recorded as the default query encoder; default: the path the shards were embedded with.

    Raises:
        ExtractionMismatchError: shards of different jobs, overlapping, missing or unfinished.
    """
    start = time.perf_counter()
    check_replaceable(Path(out_path))
    check_index_options(factory, memory_budget, target_recall)
    stores = [EmbeddingStore.open(path) for path in shard_dirs]
    stored = combine_stores(stores)
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
    )


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
) -> BuildSummary:
    """Choose, train, fill and tune the index over stored embeddings and write the index directory."""
    spec = stored.spec
    if len(stored) == 0:
        examples = "; ".join(f"{path}: {reason}" for path, reason in stored.skipped.skipped[:3])
        raise DatasetError(f"none of the {spec.gallery_count} images could be read (e.g. {examples})")
    built = make_index(stored.embeddings, stored.positions, factory, memory_budget, target_recall)
    index, fields = built.index, built.manifest_fields()
    history = HistoryEntry(
        action=action,
        source=spec.gallery_source,
        images=spec.gallery_count,
        added=index.ntotal,
        skipped=len(stored.skipped),
        shards=shards,
    )
    manifest = Manifest(
        dim=index.dim,
        count=index.ntotal,
        encoder_id=spec.encoder_id,
        encoder_path=str(Path(encoder_path).resolve()) if encoder_path is not None else None,
        levels=list(spec.levels),
        skipped=len(stored.skipped),
        history=[history.to_dict()],
        **fields,
    )
    write_index_dir(out_path, index, stored.metadata_rows(), manifest, skipped=stored.skipped)
    seconds = time.perf_counter() - start
    logger.info("indexed %d images (%d skipped) into %s in %.1fs", index.ntotal, len(stored.skipped), out_path, seconds)
    return BuildSummary(
        count=index.ntotal,
        skipped=stored.skipped,
        seconds=seconds,
        out_path=Path(out_path),
        encoder_id=spec.encoder_id,
        images=spec.gallery_count,
        extraction=run,
        **fields,
    )


def check_index_options(factory: str, memory_budget: int | str | None, target_recall: float) -> None:
    """Bad index options fail before the extraction, not after it."""
    _budget(memory_budget, factory)
    _check_target(target_recall)
