"""Batched embedding extraction over a labelled dataset, skipping and reporting unreadable images.

A gallery of a million files always holds a few broken ones; extraction must finish and say
which it left out rather than die at file 800 000. Preprocessing comes from the encoder's own
config (``encoder.config.preprocess``), never from the caller, so gallery and query images
are always prepared the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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

from models.devices import resolve_device
from models.encoder import Encoder, eval_mode
from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.images import SkipReport
from retrieval.data.skipping import SkipCorrupt, collate_skipping, report_skipped
from retrieval.data.transforms import build_transforms

__all__ = ["Extraction", "extract_embeddings"]

logger = logging.getLogger(__name__)


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
    dataset: LabelledImageDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Extraction:
    """Embed every readable image of ``dataset`` with ``encoder``.

    The dataset's own transform is ignored; images are prepared with
    ``build_transforms(encoder.config.preprocess, train=False)``. The encoder is moved to
    ``device`` and run in eval mode under ``torch.inference_mode`` (its previous train/eval
    mode is restored afterwards).

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``(N, D)`` L2-normalised embeddings.
        dataset: items to embed; ``dataset.names`` name the skipped ones in the report.
        batch_size: images per forward pass.
        device: where the encoder runs ("cpu", "cuda", "cuda:1").
        num_workers: DataLoader worker processes decoding images (0 = in this process).
        progress: show a progress bar on the terminal.

    Returns:
        The embeddings of the kept items, their dataset positions and the skip report.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    transform = build_transforms(encoder.config.preprocess, train=False)
    loader = DataLoader(
        SkipCorrupt(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
    )
    dim = encoder.embedding_dim
    chunks: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    report = SkipReport()
    start = time.perf_counter()
    with eval_mode(encoder.to(device)), progress_bar(len(dataset), progress) as advance, torch.inference_mode():
        for indices, images, skipped in loader:
            if skipped:
                report_skipped(dataset, skipped, report)
            if images is not None:
                embeddings = encoder(images.to(device, non_blocking=True))
                chunks.append(embeddings.float().cpu().numpy())
                kept.append(indices.numpy().astype(np.int64))
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


class _RateColumn(ProgressColumn):
    """Images per second, the number to watch when tuning batch size and workers."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -   img/s" if speed is None else f"{speed:6.1f} img/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A terminal progress bar (nothing at all when disabled); yields ``advance(n_images)``."""
    columns = (
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task("embedding", total=total)
        yield lambda n: bar.advance(task, n)
