"""Merge shard extraction directories into one index without holding every vector in memory.

``combine_stores`` reads all chunks of all shards into one array, and ``make_index`` then copies it again
(the held-out split): a 10M x 512 gallery needs ~40 GB for a 20 GB raw array. Here the chunk files are read
one at a time, in gallery order, three times over at most:

1. when the shards are opened (:func:`open_shards`): only each chunk's positions and skipped items, to know
   how many vectors each chunk keeps, hence the total N (which picks the factory for "auto") and where each
   vector sits in the gallery-order concatenation;
2. the training sample (only for index types that train): the rows ``FaissIndex.train`` would draw from the
   full array, gathered chunk by chunk;
3. the vectors, added in batches (gallery positions as ids), minus the seeded tuning queries, which are kept
   aside, used to tune and added last.

Sampling, held-out queries and insertion order are exactly those of ``make_index`` over the combined array
(same seed, same row numbers, same order), so the index is the same: identical for Flat, and trained on the
same sample, filled in the same list order and tuned to the same parameters for IVF and PQ factories. Memory
is the training sample, one add batch (``ADD_BATCH_BYTES`` at most), one chunk and the index itself. Metadata
rows stream too (:meth:`ShardSet.metadata_rows`, consumed lazily by ``write_index_dir``).

A whitening is not fitted here: its fit needs the whole gallery at once (and "learned" its labels), so a merge
with ``--whiten`` keeps to the in-memory path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from indexing.embedding_store import EmbeddingStore, ExtractionSpec, chunk_owners
from indexing.errors import IndexFormatError
from indexing.faiss_index import FaissIndex
from indexing.index_choice import (
    AUTO_FACTORY,
    TUNE_QUERIES,
    BuiltIndex,
    check_index_options,
    check_some_readable,
    log_tuning,
    resolve_factory,
)
from indexing.index_factory import training_sample_size
from indexing.metadata import MetadataRow
from indexing.vector_index import backend_class
from retrieval.data.images import CorruptImageError, SkipReport

__all__ = ["ADD_BATCH_BYTES", "ShardSet", "open_shards", "stream_backend_index", "stream_index"]

logger = logging.getLogger(__name__)

#: Upper bound on the vectors handed to one ``FaissIndex.add``: large batches keep the per-call cost (the
#: index's id check reads every stored id) negligible, small ones keep memory flat. 64 MiB is 32k vectors of
#: 512-d, under 1% of a 10M gallery.
ADD_BATCH_BYTES = 64 * 2**20
#: Add batches per gallery at least, so that a batch stays a small part of a mid-sized gallery too.
MIN_ADD_BATCHES = 16


@dataclass(frozen=True, eq=False)
class ShardSet:
    """Validated shards of one extraction, read chunk by chunk on demand.

    Attributes:
        spec: the first shard's spec (encoder, gallery, chunking: the same for all).
        owners: the shard holding each chunk, in chunk order (one per chunk of the gallery).
        counts: ``(chunks,)`` int64, the vectors each chunk keeps (its readable items).
        skipped: the unreadable items of every chunk, with their reasons.
    """

    spec: ExtractionSpec
    owners: tuple[EmbeddingStore, ...]
    counts: np.ndarray
    skipped: SkipReport

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        """``(chunks + 1,)``: the row in the gallery-order concatenation where each chunk's vectors start."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def vectors(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, embeddings)`` of one chunk, without its metadata.

        Raises:
            IndexFormatError: an unreadable file, or one whose content changed since the shards were opened.
        """
        store = self.owners[chunk]
        path = store.chunk_file(chunk)
        try:
            with np.load(path, allow_pickle=False) as data:
                positions = data["positions"].astype(np.int64)
                embeddings = data["embeddings"].astype(np.float32)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise IndexFormatError(
                f"cannot read {path}: {exc}; delete it and rerun to embed that chunk again"
            ) from None
        if len(positions) != self.counts[chunk] or embeddings.shape != (len(positions), self.spec.dim):
            raise IndexFormatError(
                f"{path} does not hold chunk {chunk} of this extraction (or changed during the merge)"
            )
        return positions, embeddings

    def chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first row, positions, embeddings)`` of every chunk in gallery order, one chunk in memory at a time."""
        offsets = self.offsets
        for chunk in range(len(self.owners)):
            positions, embeddings = self.vectors(chunk)
            yield int(offsets[chunk]), positions, embeddings

    def gather(self, rows: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The vectors at increasing ``rows`` of the gallery-order concatenation, reading only their chunks."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.spec.dim), np.float32)
        offsets = self.offsets
        chunk_of = np.searchsorted(offsets, rows, side="right") - 1
        bounds = np.searchsorted(chunk_of, np.arange(len(self.owners) + 1))
        for chunk in np.flatnonzero(np.diff(bounds)):
            start, stop = bounds[chunk], bounds[chunk + 1]
            out[start:stop] = self.vectors(int(chunk))[1][rows[start:stop] - offsets[chunk]]
            if progress is not None:
                progress(int(stop - start))
        return out

    def metadata_rows(self, id_offset: int = 0) -> Iterator[MetadataRow]:
        """Metadata rows with ids ``id_offset + position``, in gallery order, read lazily chunk by chunk.

        Raises:
            IndexFormatError: an unreadable chunk file or one whose rows do not match its positions.
        """
        for chunk, store in enumerate(self.owners):
            path = store.chunk_file(chunk)
            try:
                with np.load(path, allow_pickle=False) as data:
                    positions = data["positions"].astype(np.int64).tolist()
                    texts = data["rows"].tolist()
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
                raise IndexFormatError(f"cannot read {path}: {exc}") from None
            if len(texts) != len(positions) or len(positions) != self.counts[chunk]:
                raise IndexFormatError(f"{path}: {len(texts)} metadata rows for {len(positions)} vectors")
            for position, text in zip(positions, texts, strict=True):
                row = json.loads(text)
                yield MetadataRow(
                    id=id_offset + position,
                    path=row.get("path"),
                    labels=row.get("labels", {}),
                    extra=row.get("extra", {}),
                )


def open_shards(shard_dirs: list[str | Path]) -> ShardSet:
    """Open and check the shards of one extraction as ``combine_stores`` does, reading no embeddings.

    The shards must share encoder, gallery and chunk size, be finished, and cover every chunk exactly once;
    different batch sizes or runtimes are accepted with a warning (their vectors differ in the last bits).

    Raises:
        ExtractionMismatchError: shards of different jobs, overlapping, leaving chunks uncovered, or unfinished.
        IndexFormatError: a directory that is not an extraction, or a chunk file that does not fit its spec.
    """
    stores = [EmbeddingStore.open(path) for path in shard_dirs]
    owners = chunk_owners(stores)
    spec = stores[0].spec
    counts = np.zeros(len(owners), np.int64)
    skipped = SkipReport()
    for chunk, store in enumerate(owners):
        kept, lost = _chunk_census(store, chunk)
        counts[chunk] = kept
        for path, reason in lost:
            skipped.add(CorruptImageError(path, reason))
    return ShardSet(spec, tuple(owners), counts, skipped)


def _chunk_census(store: EmbeddingStore, chunk: int) -> tuple[int, list[tuple[str, str]]]:
    """How many vectors chunk ``chunk`` keeps, and its skipped items; the embeddings are not read."""
    path = store.chunk_file(chunk)
    try:
        with np.load(path, allow_pickle=False) as data:
            positions = data["positions"].astype(np.int64)
            skipped = list(zip(data["skipped_paths"].tolist(), data["skipped_reasons"].tolist(), strict=True))
            shape = _stored_shape(data, "embeddings")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise IndexFormatError(f"cannot read {path}: {exc}; delete it and rerun to embed that chunk again") from None
    expected = store.spec.chunk_positions(chunk)
    if (
        shape != (len(positions), store.spec.dim)
        or len(positions) + len(skipped) != len(expected)
        or (len(positions) and (positions.min() < expected.start or positions.max() >= expected.stop))
    ):
        raise IndexFormatError(f"{path} does not hold chunk {chunk} of this extraction; delete it and rerun")
    return len(positions), skipped


def _stored_shape(data: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    """The shape of an array in an ``.npz`` file, read from its header without loading the array."""
    if data.zip is None:
        raise ValueError("the .npz file is closed")
    with data.zip.open(f"{key}.npy") as member:
        major, _ = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(member)
    return tuple(int(n) for n in shape)


def stream_index(
    shards: ShardSet,
    factory: str = AUTO_FACTORY,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    *,
    num_tune_queries: int = TUNE_QUERIES,
    seed: int = 0,
    batch_bytes: int = ADD_BATCH_BYTES,
    progress: bool = False,
) -> BuiltIndex:
    """Choose, train, fill and tune an index over the shards' vectors, as ``make_index`` does over all of them.

    Ids are gallery positions. The training sample, the held-out tuning queries and the order of insertion are
    those ``make_index(combine_stores(...).embeddings, ...)`` uses with the same ``seed``, so both build the same
    index; here at most the training sample, one add batch and one chunk are in memory beside the index.

    Args:
        shards: from :func:`open_shards`.
        factory, memory_budget, target_recall, num_tune_queries, seed: as for ``indexing.builder.make_index``.
        batch_bytes: most bytes of vectors passed to one ``FaissIndex.add`` (also at most 1/16 of the gallery,
            and at least one chunk).
        progress: progress bars on stderr while sampling and adding.

    Raises:
        DatasetError: the shards keep no vector at all (every image was unreadable).
        ConfigError: a bad factory, budget or target, or too few vectors to train the index.
    """
    total, dim = len(shards), shards.spec.dim
    check_index_options(factory, memory_budget, target_recall)
    check_some_readable(len(shards), shards.skipped, shards.spec.gallery_count)
    factory, reason = resolve_factory(factory, memory_budget, total, dim)
    logger.info("index type %s (%s)", factory, reason)
    index = FaissIndex(dim, factory)
    if not index.is_trained:
        _train(index, factory, shards, seed, progress)
    held = np.zeros(0, np.int64)
    if factory != "Flat" and total >= 2:  # make_index's held-out draw, on the same row numbers
        size = max(1, min(num_tune_queries, total // 2))
        held = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    batch_rows = max(int(shards.spec.chunk_size), min(total // MIN_ADD_BATCHES, int(batch_bytes) // (4 * dim)))
    held_vectors, held_ids = _add_all(index, shards, held, batch_rows, progress)
    tuning = None
    if held.size:
        tuning = index.tune(held_vectors, target_recall, seed=seed)
        index.add(held_vectors, held_ids)
        log_tuning(factory, tuning)
    return BuiltIndex(index, factory, reason, tuning)


def stream_backend_index(
    shards: ShardSet,
    factory: str,
    backend: str,
    backend_options: Mapping[str, Any],
    *,
    progress: bool = False,
) -> BuiltIndex:
    """Fill a backend that builds its own structure (a Qdrant collection) chunk by chunk, with each item's labels.

    Nothing is trained or tuned here (the backend does both itself), so the chunks go in as they are read, in
    gallery order, each with the labels of its metadata rows; one chunk is in memory at a time. A failure
    discards what the backend made.

    Raises:
        DatasetError: the shards keep no vector at all.
        IndexFormatError: a chunk whose metadata rows do not match its vectors.
    """
    total = len(shards)
    check_some_readable(len(shards), shards.skipped, shards.spec.gallery_count)
    index = backend_class(backend).create(shards.spec.dim, factory, backend_options)
    rows = shards.metadata_rows()
    try:
        with _progress_bar("adding", total, progress) as advance:
            for _, positions, embeddings in shards.chunks():
                labels = []
                for position in positions.tolist():
                    row = next(rows)
                    if row.id != position:
                        raise IndexFormatError(f"metadata row {row.id} does not match vector {position}")
                    labels.append(dict(row.labels))
                index.add(embeddings, positions, labels=labels)
                advance(len(positions))
    except BaseException:
        index.discard()
        raise
    return BuiltIndex(index, index.factory, f"{backend} backend (it chooses and tunes its own index)", None)


def _train(index: FaissIndex, factory: str, shards: ShardSet, seed: int, progress: bool) -> None:
    """Train on the rows ``FaissIndex.train`` would sample from the full array, gathered chunk by chunk."""
    total = len(shards)
    size = training_sample_size(factory, total) or total
    if size < total:  # FaissIndex.train's draw; on a sample of exactly its size it draws nothing more
        rows = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    else:
        rows = np.arange(total)
        if training_sample_size(factory, total) == 0:
            logger.warning("%s: no training sample size is known for it, training on all %d vectors", factory, total)
    with _progress_bar("sampling", len(rows), progress) as advance:
        sample = shards.gather(rows, advance)
    index.train(sample, seed=seed)


def _add_all(
    index: FaissIndex, shards: ShardSet, held: np.ndarray, batch_rows: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Add every vector but the ``held`` rows in gallery order, in batches; return the held vectors and ids."""
    dim = shards.spec.dim
    held_vectors = np.empty((len(held), dim), np.float32)
    held_ids = np.empty(len(held), np.int64)
    buffer = np.empty((batch_rows, dim), np.float32)
    buffer_ids = np.empty(batch_rows, np.int64)
    filled = taken = 0
    with _progress_bar("adding", len(shards), progress) as advance:
        for start, positions, embeddings in shards.chunks():
            keep = np.ones(len(positions), bool)
            mine = held[(held >= start) & (held < start + len(positions))] - start
            keep[mine] = False
            held_vectors[taken : taken + len(mine)] = embeddings[mine]
            held_ids[taken : taken + len(mine)] = positions[mine]
            taken += len(mine)
            vectors, ids = embeddings[keep], positions[keep]
            while len(ids):
                step = min(len(ids), batch_rows - filled)
                buffer[filled : filled + step] = vectors[:step]
                buffer_ids[filled : filled + step] = ids[:step]
                filled += step
                vectors, ids = vectors[step:], ids[step:]
                if filled == batch_rows:
                    index.add(buffer, buffer_ids)
                    filled = 0
            advance(len(positions))
        if filled:
            index.add(buffer[:filled], buffer_ids[:filled])
    return held_vectors, held_ids


@contextlib.contextmanager
def _progress_bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A vectors-counting bar on stderr (nothing when disabled); yields ``advance(n)``."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
