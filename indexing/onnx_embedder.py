"""Gallery extraction through ONNX Runtime on CPU: the exported encoder fed by a thread that decodes ahead.

Why it is faster than the PyTorch pipeline on CPU (``benchmarks/bench_extract.py`` measures both side by
side; see the numbers there):

- the model: ONNX Runtime with every graph optimisation on (``ORT_ENABLE_ALL``: operator fusion and the
  blocked NCHWc convolution layout of its CPU kernels) runs the same graph ~2x faster than eager PyTorch;
- the input: decoding, resizing and normalising are Pillow + numpy (``retrieval.data.preprocess``, the same
  arithmetic as the torch transforms, pixel for pixel) and run in a feeder thread while ONNX Runtime
  computes the previous batch. Pillow, numpy and ONNX Runtime all release the GIL, so the two overlap; the
  torch transforms in the main process instead pay for torch's intra-op thread pool on every tiny tensor.

Images travel as uint8 from the decoder (or the DataLoader workers, with ``num_workers``: a quarter of the
bytes through shared memory) and are normalised per batch in the feeder thread (:func:`normalise_batch`, the
same element-wise arithmetic as ``preprocess_array``, bit for bit).
ONNX Runtime's intra-op threads follow ``--threads`` / ``RETRIEVAL_THREADS`` (``retrieval.threads``), else
its own default (one per physical core).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from indexing.onnx_cache import OnnxExtractionError
from models.onnx_export import INPUT_NAME, OUTPUT_NAME
from retrieval.data.preprocess import PreprocessConfig, to_uint8_chw
from retrieval.data.skipping import ImageSource, SkipCorrupt, collate_skipping
from retrieval.threads import compute_threads

__all__ = ["OnnxGalleryEncoder", "normalise_batch", "prefetched"]

logger = logging.getLogger(__name__)

#: Batches decoded ahead of the one ONNX Runtime is computing: one keeps both busy, two absorb jitter.
PREFETCH_BATCHES = 2
#: Rows whose norm is below this are left as they are instead of being blown up by the division.
_MIN_NORM = 1e-12

Batch = tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]


class OnnxGalleryEncoder:
    """An exported gallery encoder in an ONNX Runtime CPU session, embedding batches of gallery images.

    Args:
        path: the ``.onnx`` file (``indexing.onnx_cache.gallery_onnx``).
        encoder_id: the id of the checkpoint it was exported from.
        embedding_dim: length of the output vectors.
        preprocess: the encoder's preprocessing (from its checkpoint config).
        threads: intra-op threads; default ``--threads`` / ``RETRIEVAL_THREADS``, else ONNX Runtime's choice.

    Raises:
        OnnxExtractionError: ONNX Runtime cannot open the file.
    """

    runtime = "onnx"

    def __init__(
        self,
        path: str | Path,
        encoder_id: str,
        embedding_dim: int,
        preprocess: PreprocessConfig,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.encoder_id = encoder_id
        self.embedding_dim = int(embedding_dim)
        self.preprocess = preprocess
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = compute_threads() if threads is None else threads
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # ONNX Runtime's intra-op threads busy-wait between runs by default; here they would take the cores the
        # feeder thread needs to decode the next batch (and, on a shared machine, everyone else's).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise OnnxExtractionError(
                f"ONNX Runtime cannot open {self.path}: {' '.join(str(exc).split())}; delete it to export the "
                "encoder again, or extract with --runtime torch"
            ) from exc
        self.threads = threads

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """A normalised float32 batch ``(N, 3, S, S)`` -> ``(N, D)`` float32 rows, L2-normalised in float32."""
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(batch), self.embedding_dim):
            raise OnnxExtractionError(
                f"{self.path} returned shape {out.shape} for {len(batch)} images, expected "
                f"({len(batch)}, {self.embedding_dim}); delete it to export the encoder again"
            )
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), _MIN_NORM)

    def embed_batches(
        self, source: ImageSource, batches: Sequence[Sequence[int]], num_workers: int = 0
    ) -> Iterator[Batch]:
        """Embed ``source`` batch by batch, exactly the given batches in the given order.

        A feeder thread decodes (or collects from ``num_workers`` DataLoader processes) and normalises up to
        ``PREFETCH_BATCHES`` batches ahead while ONNX Runtime runs.

        Yields:
            ``(positions, embeddings, skipped)`` per batch, as ``indexing.extract.embed_batches`` does.
        """
        empty = np.zeros((0, self.embedding_dim), np.float32)
        for positions, pixels, skipped in prefetched(self._inputs(source, batches, num_workers)):
            embeddings = empty if pixels is None else self.embed(pixels)
            yield positions, embeddings, skipped

    def _inputs(
        self, source: ImageSource, batches: Sequence[Sequence[int]], num_workers: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]]:
        """Normalised float32 batches from a DataLoader of uint8 images (runs in the feeder thread)."""
        loader = DataLoader(
            SkipCorrupt(source, partial(_uint8_tensor, pre=self.preprocess)),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=collate_skipping,
            persistent_workers=False,
        )
        for indices, images, skipped in loader:
            pixels = None if images is None else normalise_batch(images.numpy(), self.preprocess)
            yield indices.numpy().astype(np.int64), pixels, skipped

    def __repr__(self) -> str:
        return f"OnnxGalleryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r}, threads={self.threads})"


def normalise_batch(pixels: np.ndarray, pre: PreprocessConfig) -> np.ndarray:
    """uint8 ``(N, 3, S, S)`` -> normalised float32: ``normalise_array``'s operations in its order, in place.

    The same arithmetic gives the same bits; doing it in one buffer instead of four temporaries halves the
    time on a batch of 64 images at 224 px (memory traffic, not arithmetic, is the cost).
    """
    out = pixels.astype(np.float32)
    out /= np.float32(255.0)
    out -= np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    out /= np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return out


def _uint8_tensor(image: Image.Image, pre: PreprocessConfig) -> torch.Tensor:
    """The resized RGB pixels as a uint8 ``(3, S, S)`` tensor (a module-level function: workers pickle it)."""
    return torch.from_numpy(to_uint8_chw(image, pre))


class _Failure:
    """An exception raised in the feeder thread, carried to the consumer to be raised there."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetched(items: Iterable[Any], depth: int = PREFETCH_BATCHES) -> Iterator[Any]:
    """``items``, produced by a daemon thread up to ``depth`` ahead of the consumer.

    An exception in the producer is raised in the consumer at the item where it happened. When the consumer
    stops early (an error, Ctrl-C, a closed generator) the producer is told to stop and is not waited for
    longer than the item it is producing.
    """
    pipe: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                pipe.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # carried over and raised in the consumer
            put(_Failure(exc))

    feeder = threading.Thread(target=produce, name="extract-feeder", daemon=True)
    feeder.start()
    try:
        while True:
            item = pipe.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        feeder.join(timeout=5.0)
