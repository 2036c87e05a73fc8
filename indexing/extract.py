"""Batched embedding extraction, in memory or into resumable chunk files, skipping unreadable images.

A gallery of a million files always holds a few broken ones; extraction must finish and say
which it left out rather than die at file 800 000, and a run killed at file 800 000 must not
start again at file 0 (:func:`extract_to_store` writes each finished chunk to disk).
Preprocessing comes from the encoder's own config (``encoder.config.preprocess``), never from
the caller, so gallery and query images are always prepared the same way.

The encoder runs in PyTorch (:func:`embed_batches`), or in another runtime given as a
:class:`BatchEmbedder` (``indexing.onnx_embedder.OnnxGalleryEncoder``: ONNX Runtime on CPU); the chunking,
skipping and progress around it are the same.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.data import DataLoader

from indexing.embedding_store import EmbeddingStore, ExtractionMismatchError
from models.devices import resolve_device
from models.encoder import Encoder, eval_mode
from retrieval.data.gallery import Gallery
from retrieval.data.images import SkipReport
from retrieval.data.skipping import ImageSource, SkipCorrupt, collate_skipping, report_skipped
from retrieval.data.transforms import build_transforms

__all__ = [
    "BatchEmbedder",
    "ChunkBuffer",
    "Extraction",
    "StoreRun",
    "embed_batches",
    "embed_images",
    "extract_embeddings",
    "extract_to_store",
]

logger = logging.getLogger(__name__)

#: What an embedding loop yields per batch: positions of the readable items, their embeddings, the skipped ones.
EmbeddedBatch = tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]


class BatchEmbedder(Protocol):
    """A runtime other than eager PyTorch that embeds gallery batches (``indexing.onnx_embedder``).

    Attributes:
        runtime: its name as recorded in an extraction spec (``"onnx"``).
        encoder_id: the checkpoint whose vectors it computes.
        embedding_dim: length of the vectors.
    """

    runtime: str
    encoder_id: str
    embedding_dim: int

    def embed_batches(
        self, source: ImageSource, batches: Sequence[Sequence[int]], num_workers: int = 0
    ) -> Iterator[EmbeddedBatch]:
        """Exactly the given batches in the given order, as :func:`embed_batches` yields them."""
        ...


@dataclass(frozen=True, eq=False)
class Extraction:
    """Embeddings of the readable items of a dataset.

    Attributes:
        embeddings: ``(M, D)`` float32, L2-normalised, row ``j`` for dataset item ``indices[j]``.
        indices: ``(M,)`` int64 dataset positions of the kept items, increasing.
        skipped: the items that could not be read, by name, with the reason.
    """

    embeddings: np.ndarray
    indices: np.ndarray
    skipped: SkipReport

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def extract_embeddings(
    encoder: Encoder,
    dataset: ImageSource,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    amp: bool = True,
    embedder: BatchEmbedder | None = None,
) -> Extraction:
    """Embed every readable image of ``dataset`` with ``encoder``, in memory.

    The dataset's own transform is ignored; images are prepared with
    ``build_transforms(encoder.config.preprocess, train=False)``. The encoder is moved to
    ``device`` and run in eval mode under ``torch.inference_mode`` (its previous train/eval
    mode is restored afterwards). For galleries too large to hold or to embed in one go, see
    :func:`extract_to_store`.

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``(N, D)`` L2-normalised embeddings.
        dataset: items to embed (a labelled dataset or a ``Gallery``); its ``names`` name the skipped ones.
        batch_size: images per forward pass.
        device: where the encoder runs ("cpu", "cuda", "cuda:1").
        num_workers: DataLoader worker processes decoding images (0 = in this process).
        progress: show a progress bar on the terminal.
        amp: on CUDA, run the encoder under float16 autocast (ignored on CPU).
        embedder: run this instead of ``encoder`` in PyTorch (``device`` and ``amp`` are then unused).

    Returns:
        The embeddings of the kept items, their dataset positions and the skip report.
    """
    _check_batch_size(batch_size)
    batches = [range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
    dim = encoder.embedding_dim
    chunks: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    report = SkipReport()
    start = time.perf_counter()
    stream = _stream(encoder, embedder, dataset, batches, device, num_workers, amp)
    with progress_bar(len(dataset), progress) as advance, contextlib.closing(stream):
        for indices, embeddings, skipped in stream:
            report_skipped(dataset, skipped, report)
            chunks.append(embeddings)
            kept.append(indices)
            advance(len(indices) + len(skipped))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    indices = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    logger.info(
        "embedded %d of %d images in %.1fs (%d skipped)",
        len(indices),
        len(dataset),
        time.perf_counter() - start,
        len(report),
    )
    return Extraction(np.ascontiguousarray(embeddings, dtype=np.float32), indices, report)


@dataclass(frozen=True)
class StoreRun:
    """What one :func:`extract_to_store` call did.

    Attributes:
        chunks_before: chunks of the shard already on disk when it started (a resumed run has some).
        chunks_written: chunks it embedded and wrote.
        images_embedded: images it embedded now.
        images_skipped: unreadable images it met now (earlier runs' are in their chunk files).
        seconds: wall-clock time.
        runtime: what ran the encoder (``torch`` or ``onnx``).
        runtime_reason: why that runtime (``indexing.extract_job.choose_runtime``), when it was chosen.
    """

    chunks_before: int
    chunks_written: int
    images_embedded: int
    images_skipped: int
    seconds: float
    runtime: str = "torch"
    runtime_reason: str | None = None

    @property
    def images_per_second(self) -> float:
        return (self.images_embedded + self.images_skipped) / self.seconds if self.seconds > 0 else 0.0


def extract_to_store(
    encoder: Encoder,
    gallery: Gallery,
    store: EmbeddingStore,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    amp: bool = True,
    embedder: BatchEmbedder | None = None,
) -> StoreRun:
    """Embed the chunks of ``store``'s shard that are not on disk yet, writing each chunk as soon as it is done.

    Batches are cut inside chunks (``store.spec.batch_size`` images from the chunk's start), so a chunk's
    vectors do not depend on which run or machine embedded it. An interruption (Ctrl-C, kill, crash) loses
    at most the chunk in progress; calling this again continues with the missing ones.

    Args:
        encoder: the encoder named by ``store.spec.encoder_id``.
        gallery: the gallery named by ``store.spec.gallery_fingerprint``.
        store: where the chunks go (``EmbeddingStore.open_for``).
        device, num_workers, amp, embedder: as for :func:`extract_embeddings`.
        progress: progress bar with images/s and ETA; it starts at the images already embedded.

    Raises:
        ExtractionMismatchError: ``encoder``, ``gallery`` or the runtime is not the one the store was opened for.
    """
    spec = store.spec
    if str(encoder.encoder_id) != spec.encoder_id:
        raise ExtractionMismatchError(f"encoder {encoder.encoder_id} is not the store's encoder {spec.encoder_id}")
    if embedder is not None and embedder.encoder_id != spec.encoder_id:
        raise ExtractionMismatchError(f"{embedder!r} does not run the store's encoder {spec.encoder_id}")
    if len(gallery) != spec.gallery_count:
        raise ExtractionMismatchError(f"gallery has {len(gallery)} items, the store expects {spec.gallery_count}")
    runtime = "torch" if embedder is None else embedder.runtime
    start = time.perf_counter()
    missing = store.missing_chunks()
    if missing and runtime != spec.runtime:
        raise ExtractionMismatchError(f"the store's chunks are embedded by {spec.runtime}, not {runtime}")
    chunks_before = len(spec.chunk_numbers()) - len(missing)
    plan: list[tuple[int, range]] = []  # (chunk, batch) in order; batches never straddle a chunk
    for chunk in missing:
        positions = spec.chunk_positions(chunk)
        plan.extend(
            (chunk, range(s, min(s + spec.batch_size, positions.stop)))
            for s in range(positions.start, positions.stop, spec.batch_size)
        )
    remaining = sum(len(spec.chunk_positions(c)) for c in missing)
    if missing:
        logger.info(
            "embedding %d of %d chunks (%d images) into %s", len(missing), len(spec.chunk_numbers()), remaining, store
        )
    pending = ChunkBuffer(gallery)
    embedded = skipped_now = 0
    batches = [batch for _, batch in plan]
    stream = _stream(encoder, embedder, gallery, batches, device, num_workers, amp)
    # Closing the stream on an error (a failed write, Ctrl-C) stops a feeder thread and its workers at once.
    completed = spec.positions() - remaining
    with progress_bar(spec.positions(), progress, completed=completed) as advance, contextlib.closing(stream):
        for (chunk, batch), (indices, embeddings, skipped) in zip(plan, stream, strict=True):
            pending.add(indices, embeddings, skipped)
            embedded, skipped_now = embedded + len(indices), skipped_now + len(skipped)
            if batch.stop == spec.chunk_positions(chunk).stop:
                pending.write(store, chunk)
            advance(len(batch))
    return StoreRun(chunks_before, len(missing), embedded, skipped_now, time.perf_counter() - start, spec.runtime)


class ChunkBuffer:
    """The batches of the chunk in progress, until its last batch arrives and it is written.

    Every extraction engine writes its chunks through it (``indexing.ray_extract`` too), so their chunk files
    hold the same rows and skip reports.
    """

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self._reset()

    def _reset(self) -> None:
        self.positions: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.skipped = SkipReport()

    def add(self, indices: np.ndarray, embeddings: np.ndarray, skipped: list[tuple[int, str]]) -> None:
        self.positions.append(indices)
        self.embeddings.append(embeddings)
        report_skipped(self.gallery, skipped, self.skipped)

    def write(self, store: EmbeddingStore, chunk: int) -> None:
        positions = np.concatenate(self.positions)
        rows = [
            {"path": self.gallery.names[i], "labels": self.gallery.labels_of(i), "extra": self.gallery.extra_of(i)}
            for i in positions.tolist()
        ]
        store.write_chunk(chunk, positions, np.concatenate(self.embeddings), rows, self.skipped.skipped)
        self._reset()


def _stream(
    encoder: Encoder,
    embedder: BatchEmbedder | None,
    source: ImageSource,
    batches: Sequence[Sequence[int]],
    device: str | torch.device,
    num_workers: int,
    amp: bool,
) -> Iterator[EmbeddedBatch]:
    if embedder is not None:
        return embedder.embed_batches(source, batches, num_workers)
    return embed_batches(encoder, source, batches, device, num_workers, amp)


def embed_batches(
    encoder: Encoder,
    source: ImageSource,
    batches: Sequence[Sequence[int]],
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp: bool = True,
) -> Iterator[EmbeddedBatch]:
    """Embed ``source`` batch by batch, exactly the given batches in the given order.

    Worker processes decode and resize (``num_workers``) while the encoder runs; on CUDA the batches
    are pinned and copied asynchronously, and the encoder runs under float16 autocast when ``amp``
    (embeddings come back float32 and re-normalised).

    Yields:
        ``(positions, embeddings, skipped)`` per batch: int64 positions of the readable items, their
        ``(n, D)`` float32 embeddings, and ``(position, reason)`` for the unreadable ones.
    """
    device = resolve_device(device)
    transform = build_transforms(encoder.config.preprocess, train=False)
    loader = DataLoader(
        SkipCorrupt(source, transform),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    empty = np.zeros((0, encoder.embedding_dim), np.float32)
    with eval_mode(encoder.to(device)), torch.inference_mode():
        for indices, images, skipped in loader:
            if images is None:
                yield indices.numpy().astype(np.int64), empty, skipped
                continue
            yield indices.numpy().astype(np.int64), embed_images(encoder, images, device, amp), skipped


def embed_images(encoder: Encoder, images: torch.Tensor, device: torch.device, amp: bool) -> np.ndarray:
    """One batch of prepared images through the encoder: ``(n, D)`` float32, L2-normalised.

    Under float16 autocast on CUDA when ``amp``; the embeddings are then taken back to float32 and re-normalised.
    Every PyTorch extraction path embeds through here (``embed_batches``, the Ray actors), so they agree to
    the bit. The caller holds the encoder in eval mode on ``device``, under ``torch.inference_mode()``.
    """
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" and amp else nullcontext()
    with autocast:
        embeddings = encoder(images.to(device, non_blocking=True))
    return torch.nn.functional.normalize(embeddings.float(), dim=1).cpu().numpy()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


class _RateColumn(ProgressColumn):
    """Images per second, the number to watch when tuning batch size and workers."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -   img/s" if speed is None else f"{speed:6.1f} img/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, completed: int = 0) -> Iterator[Callable[[int], None]]:
    """A terminal progress bar (nothing at all when disabled); yields ``advance(n_images)``.

    ``completed`` starts the bar part-way (a resumed extraction); the rate and ETA count only this run.
    """
    columns = (
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task("embedding", total=total, completed=completed)
        yield lambda n: bar.advance(task, n)
