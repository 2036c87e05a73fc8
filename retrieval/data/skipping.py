"""Skip-and-report loading for bulk jobs: one unreadable file must not abort indexing a million.

:class:`SkipCorrupt` turns a dataset item into ``(index, tensor or None, reason or None)`` instead of
raising, and :func:`collate_skipping` batches the readable items while listing the skipped ones, so a
DataLoader (with workers) keeps going and the job can write a :class:`~retrieval.data.images.SkipReport`
at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval.data.images import CorruptImageError, SkipReport

__all__ = ["ImageSource", "SkipCorrupt", "SkippingItem", "collate_skipping", "report_skipped"]

logger = logging.getLogger(__name__)

SkippingItem = tuple[int, torch.Tensor | None, str | None]


class ImageSource(Protocol):
    """What skip-and-report loading reads: a labelled dataset or a gallery (``retrieval.data.gallery``)."""

    names: list[str] | Sequence[str]
    transform: Callable[[Image.Image], Any] | None

    def __len__(self) -> int: ...

    def load_image(self, i: int) -> Image.Image: ...


class SkipCorrupt(Dataset):
    """Wrap a dataset so that corrupt images come back as a reason instead of an exception.

    Args:
        dataset: the dataset to read (its own transform is ignored when ``transform`` is given).
        transform: ``PIL.Image -> tensor (3, H, W)``; defaults to ``dataset.transform``.

    Raises:
        ValueError: neither ``transform`` nor ``dataset.transform`` is set (batches need tensors).
    """

    def __init__(self, dataset: ImageSource, transform: Callable[[Image.Image], Any] | None = None) -> None:
        transform = transform if transform is not None else dataset.transform
        if transform is None:
            raise ValueError("SkipCorrupt needs a transform that turns images into tensors")
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> SkippingItem:
        try:
            image = self.dataset.load_image(i)
        except CorruptImageError as exc:
            return i, None, exc.reason
        try:
            tensor = self.transform(image)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:  # odd sizes/modes that decoded fine
            return i, None, f"preprocessing failed: {exc or type(exc).__name__}"
        return i, tensor, None


def collate_skipping(batch: Sequence[SkippingItem]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Batch the readable items of ``SkipCorrupt`` and list the others.

    Returns:
        ``(indices, images, skipped)``: ``indices`` is a LongTensor of the kept items' dataset indices,
        aligned with ``images`` ``(B, 3, H, W)`` (``None`` when every item of the batch was skipped);
        ``skipped`` is a list of ``(index, reason)``.
    """
    kept = [(i, t) for i, t, _ in batch if t is not None]
    skipped = [(int(i), str(reason)) for i, t, reason in batch if t is None]
    indices = torch.tensor([i for i, _ in kept], dtype=torch.long)
    images = torch.stack([t for _, t in kept]) if kept else None
    return indices, images, skipped


def report_skipped(
    dataset: ImageSource, skipped: Sequence[tuple[int, str]], report: SkipReport | None = None
) -> SkipReport:
    """Add skipped ``(index, reason)`` pairs to a :class:`SkipReport`, naming items by ``dataset.names``.

    Each skip is also logged as a warning so that an interactive run shows it as it happens.
    """
    report = report if report is not None else SkipReport()
    for index, reason in skipped:
        name = dataset.names[int(index)]
        logger.warning("skipping %s: %s", name, reason)
        report.add(CorruptImageError(name, reason))
    return report
