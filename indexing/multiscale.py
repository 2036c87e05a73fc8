"""Multi-scale, aspect-preserving extraction: the gallery-side descriptor of landmark retrieval.

Each image keeps its aspect ratio. Its long side is first capped at ``max_side`` (smaller images are left
as they are), then it is embedded once per scale ``s`` (by default ``{1/√2, 1, √2}``) and the L2-normalised
descriptors are averaged with a plain mean and L2-normalised again. cirtorch averages with a GeM-style
mean (``(mean_s d_s^p)^(1/p)`` with GeM's ``p``); the plain mean used here is the ``p = 1`` case.

How the pixels are prepared:

- The cap is a PIL bilinear (antialiased) resize to ``(round(w * r), round(h * r))`` with
  ``r = max_side / long side``, done in the DataLoader workers, which hand over uint8 tensors.
- Each scale resizes the capped image once, on ``device``, with torch's antialiased bilinear
  interpolation to ``(max(min_side, round(w * s)), max(min_side, round(h * s)))``; each side is clamped
  separately, so a very thin image is stretched a little rather than shrunk below what a CNN with
  stride 32 can see. An image already at the target size is not resampled.
- Normalisation uses the encoder's own ``config.preprocess`` mean and std; its ``input_size`` and
  ``resize`` policy (square inputs) are deliberately ignored: this path exists to keep the aspect ratio.

Batching: images of different shapes cannot share a tensor, so readable images are gathered in windows
of ``SORT_WINDOW_BATCHES * batch_size``, sorted by (aspect ratio, long side) and cut into batches of
consecutive images. Every image of a batch is **resized** to one shared size: the capped size of the
batch's median image (its median aspect ratio, with that image's long side), times the scale. Resizing
was chosen over padding because padding adds border content that the backbone responds to and GeM then
pools, on every image of a padded batch, whereas the resize only distorts images whose aspect ratio
already lies close to the median. Consequences: a batch of one (``batch_size=1``) is the exact per-image
computation, and a batch whose images share one capped size (the common case of galleries of photos
from a few cameras) is exact too; elsewhere descriptors differ slightly from the per-image ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from indexing.extract import Extraction, progress_bar
from models.devices import resolve_device
from models.encoder import Encoder, eval_mode
from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.images import SkipReport
from retrieval.data.skipping import SkipCorrupt, SkippingItem, report_skipped

__all__ = ["DEFAULT_SCALES", "MIN_SIDE", "SORT_WINDOW_BATCHES", "capped_size", "extract_multiscale", "scaled_size"]

logger = logging.getLogger(__name__)

#: The retrieval convention for multi-scale descriptors (cirtorch uses ``(1, 1/√2, 1/2)``).
DEFAULT_SCALES: tuple[float, ...] = (1 / math.sqrt(2), 1.0, math.sqrt(2))
#: Smallest side, in pixels, that an image is resized to at any scale (one cell of a stride-32 feature map).
MIN_SIDE = 32
#: Images sorted together by shape before batching, in batches: larger windows group shapes better but
#: hold more decoded images in memory.
SORT_WINDOW_BATCHES = 8


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` shrunk, aspect kept, so that the long side is at most ``max_side``; never enlarged."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    ratio = max_side / long_side
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def scaled_size(width: int, height: int, scale: float, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """``(width, height)`` times ``scale``, rounded, each side at least ``min_side``."""
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


class _CapLongSide:
    """``PIL.Image -> uint8 tensor (3, H, W)`` with the long side capped at ``max_side`` (picklable for workers)."""

    def __init__(self, max_side: int) -> None:
        self.max_side = max_side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image if image.mode == "RGB" else image.convert("RGB")
        size = capped_size(image.width, image.height, self.max_side)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _as_is(item: SkippingItem) -> SkippingItem:
    """Collate for ``batch_size=None``: keep the item (its tensor sizes differ from image to image)."""
    return item


def _shape_key(item: tuple[int, torch.Tensor]) -> tuple[float, int, int]:
    index, pixels = item
    height, width = pixels.shape[-2:]
    return width / height, max(width, height), index


def _resize_normalise(
    pixels: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 ``(3, H, W)`` on the target device -> normalised float32 ``(3, h, w)`` at ``size = (w, h)``."""
    image = pixels.float().div_(255.0)
    width, height = size
    if image.shape[-2:] != (height, width):
        batch = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        image = batch[0]
    return (image - mean) / std


def _embed_batch(
    encoder: Encoder,
    batch: Sequence[tuple[int, torch.Tensor]],
    scales: Sequence[float],
    min_side: int,
    device: torch.device,
) -> torch.Tensor:
    """Multi-scale descriptors ``(B, D)`` of a batch sorted by shape, all resized to its median image's size."""
    pre = encoder.config.preprocess
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(3, 1, 1)
    base_height, base_width = batch[len(batch) // 2][1].shape[-2:]
    pixels = [p.to(device, non_blocking=True) for _, p in batch]
    total = None
    for scale in scales:
        size = scaled_size(base_width, base_height, scale, min_side)
        images = torch.stack([_resize_normalise(p, size, mean, std) for p in pixels])
        descriptors = F.normalize(encoder(images).float(), dim=1)
        total = descriptors if total is None else total + descriptors
    return F.normalize(total / len(scales), dim=1)


def _readable_windows(
    loader: DataLoader, window: int, skip: Callable[[int, str], None]
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Group the readable items of a ``SkipCorrupt`` loader into lists of ``window``; report the others."""
    buffer: list[tuple[int, torch.Tensor]] = []
    for index, pixels, reason in loader:
        if pixels is None:
            skip(int(index), str(reason))
            continue
        buffer.append((int(index), pixels))
        if len(buffer) >= window:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def _embed_window(
    encoder: Encoder,
    buffer: list[tuple[int, torch.Tensor]],
    batch_size: int,
    scales: Sequence[float],
    min_side: int,
    device: torch.device,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Sort a window of images by shape and embed it in batches; yields ``(dataset indices, descriptors)``."""
    ordered = sorted(buffer, key=_shape_key)
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first : first + batch_size]
        yield [i for i, _ in batch], _embed_batch(encoder, batch, scales, min_side, device).cpu().numpy()


def _check_arguments(scales: Sequence[float], max_side: int, batch_size: int, min_side: int) -> None:
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {list(scales)}")
    if max_side < 1 or min_side < 1:
        raise ValueError(f"max_side and min_side must be at least 1, got {max_side} and {min_side}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def extract_multiscale(
    encoder: Encoder,
    dataset: LabelledImageDataset,
    scales: Sequence[float] = DEFAULT_SCALES,
    max_side: int = 1024,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    *,
    min_side: int = MIN_SIDE,
) -> Extraction:
    """Embed every readable image of ``dataset`` at several scales, keeping its aspect ratio.

    See the module docstring for the exact resizing, averaging and batching rules. The encoder runs in
    eval mode under ``torch.inference_mode`` on ``device`` (its train/eval mode is restored afterwards);
    unreadable images are skipped and reported as :func:`indexing.extract.extract_embeddings` does.

    Args:
        encoder: maps ``(N, 3, H, W)`` images of any size to ``(N, D)`` L2-normalised embeddings.
        dataset: items to embed, read with ``dataset.load_image``; its own transform is ignored.
        scales: resize factors applied to the capped image; the descriptors are averaged over them.
        max_side: cap on the long side before scaling; smaller images are not enlarged to it.
        batch_size: images per forward pass; 1 gives the exact per-image computation.
        device: where the encoder and the resizing run ("cpu", "cuda", "cuda:1").
        num_workers: DataLoader worker processes decoding and capping images (0 = in this process).
        progress: show a progress bar on the terminal.
        min_side: smallest side, in pixels, of any resized image.

    Returns:
        The embeddings ``(M, D)`` float32 of the kept items, their dataset positions (increasing) and the
        skip report.
    """
    _check_arguments(scales, max_side, batch_size, min_side)
    device = resolve_device(device)
    loader = DataLoader(
        SkipCorrupt(dataset, _CapLongSide(max_side)),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
    )
    window = batch_size * SORT_WINDOW_BATCHES
    indices: list[int] = []
    chunks: list[np.ndarray] = []
    report = SkipReport()
    start = time.perf_counter()
    with eval_mode(encoder.to(device)), progress_bar(len(dataset), progress) as advance, torch.inference_mode():

        def skip(index: int, reason: str) -> None:
            report_skipped(dataset, [(index, reason)], report)
            advance(1)

        for buffer in _readable_windows(loader, window, skip):
            for batch_indices, descriptors in _embed_window(encoder, buffer, batch_size, scales, min_side, device):
                indices.extend(batch_indices)
                chunks.append(descriptors)
                advance(len(batch_indices))
    order = np.argsort(np.asarray(indices, dtype=np.int64), kind="stable")
    embeddings = np.concatenate(chunks)[order] if chunks else np.zeros((0, encoder.embedding_dim), np.float32)
    kept = np.asarray(indices, dtype=np.int64)[order]
    logger.info(
        "embedded %d of %d images at %d scales in %.1fs (%d skipped)",
        len(kept),
        len(dataset),
        len(scales),
        time.perf_counter() - start,
        len(report),
    )
    return Extraction(np.ascontiguousarray(embeddings, dtype=np.float32), kept, report)
