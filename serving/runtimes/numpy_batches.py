"""Torch-free batching for the exported-model runtimes (ONNX Runtime, TensorRT): PIL images in, numpy batches out.

The preprocessing is ``retrieval.data.preprocess``, pixel-identical to the torch pipeline the gallery was
embedded with, so an ONNX query lands where the same image embedded by the checkpoint would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from retrieval.data.preprocess import PreprocessConfig, preprocess_array, to_uint8_chw
from serving.runtimes.base import QueryEncoderError

__all__ = ["chunks", "finish_embeddings", "model_inputs", "pad_batch"]

#: Rows whose norm is below this are left as they are instead of being blown up by the division.
_MIN_NORM = 1e-12


def chunks(images: Sequence[Image.Image], size: int) -> Iterator[Sequence[Image.Image]]:
    """Consecutive slices of at most ``size`` images."""
    for start in range(0, len(images), size):
        yield images[start : start + size]


def model_inputs(
    images: Sequence[Image.Image], pre: PreprocessConfig, input_format: str, dtype: np.dtype
) -> np.ndarray:
    """Images -> the ``(N, 3, S, S)`` batch a model with ``input_format`` takes, as ``dtype``.

    ``uint8_rgb`` models (the mobile export) take the resized RGB pixels and normalise inside the graph;
    ``float32_normalized`` models take the normalised floats (cast to ``dtype``, e.g. float16 for a model
    whose input is half precision).
    """
    if input_format == "uint8_rgb":
        batch = np.stack([to_uint8_chw(image, pre) for image in images])
    else:
        batch = np.stack([preprocess_array(image, pre) for image in images])
    return np.ascontiguousarray(batch, dtype=dtype)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` grown to ``size`` rows by repeating its last row, for models (or profiles) with a fixed batch."""
    missing = size - len(batch)
    if missing <= 0:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], missing, axis=0)])


def finish_embeddings(parts: Sequence[np.ndarray], count: int, dim: int, source: str) -> np.ndarray:
    """Concatenated model outputs as ``(count, dim)`` float32 rows, L2-normalised again in float32.

    Exported models normalise their output themselves, but an fp16 or int8 model does it in low
    precision (norms off by ~1e-3); the index scores are cosines, so the rows are normalised once more here.
    For an fp32 model this changes nothing beyond float rounding.

    Raises:
        QueryEncoderError: the model produced a shape other than ``(count, dim)`` (the file's metadata lies).
    """
    out = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]) if parts else np.zeros((0, dim), np.float32)
    if out.shape != (count, dim):
        raise QueryEncoderError(
            f"{source} produced embeddings of shape {out.shape} for {count} images, but its metadata says "
            f"embedding_dim {dim}: the model and its metadata disagree; export it again"
        )
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out = out / np.maximum(norms, _MIN_NORM)
    return np.ascontiguousarray(out, dtype=np.float32)
