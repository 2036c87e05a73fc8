"""How closely an int8 model follows its float32 original: embedding cosines, a sample search, latency.

A quantised model is only worth shipping if searches with it return what the float model's would. Two
measures on held-out images: the cosine between the two models' embeddings of each image, and a sample
search in which each image queries the others (a gallery embedded by the float model, as the server's
index is) once with its float32 and once with its int8 embedding; the overlap is the mean fraction of
shared top-k ids. Latency is timed at batch 1 with both models in one process, interleaved, so a change
in machine load hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Agreement",
    "embed_each",
    "interleaved_latency_ms",
    "measure_agreement",
    "row_cosines",
    "top_k_overlap",
]


@dataclass(frozen=True)
class Agreement:
    """Agreement of a candidate model with a reference on held-out images.

    Attributes:
        images: number of held-out images.
        mean_cosine: mean cosine between the two models' embeddings of the same image.
        min_cosine: the worst image's cosine.
        k: neighbours compared in the sample search (10, or fewer with few images).
        top_k_overlap: mean fraction of top-``k`` ids shared by reference and candidate queries.
    """

    images: int
    mean_cosine: float
    min_cosine: float
    k: int
    top_k_overlap: float


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between row ``i`` of ``a`` and row ``i`` of ``b``, for every ``i`` (NaN rows count as -1)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return np.nan_to_num((a * b).sum(axis=1) / norms, nan=-1.0)


def top_k_overlap(gallery: np.ndarray, reference_queries: np.ndarray, candidate_queries: np.ndarray, k: int) -> float:
    """Mean fraction of shared top-``k`` gallery ids when query ``i`` searches every gallery row but row ``i``.

    ``gallery``, ``reference_queries`` and ``candidate_queries`` embed the same images in the same order;
    scores are inner products. Ties are broken by the lower id, identically for both queries.

    Raises:
        ValueError: shapes differ, or ``k`` is not in ``[1, n - 1]``.
    """
    n = len(gallery)
    if reference_queries.shape != gallery.shape or candidate_queries.shape != gallery.shape:
        raise ValueError(f"shapes differ: {gallery.shape}, {reference_queries.shape}, {candidate_queries.shape}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} images, got {k}")

    def top(queries: np.ndarray) -> np.ndarray:
        scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
        np.fill_diagonal(scores, -np.inf)  # an image does not find itself
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    shared = [len(np.intersect1d(r, c)) for r, c in zip(top(reference_queries), top(candidate_queries), strict=True)]
    return float(np.mean(shared)) / k


def embed_each(session: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """Embed ``(3, S, S)`` images one at a time (a static batch-1 model) with an ONNX Runtime session."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None]})[0] for image in images]).astype(np.float32)


def measure_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> Agreement:
    """Cosines and the sample-search overlap of ``candidate`` embeddings against ``reference`` ones (same images)."""
    cosines = row_cosines(reference, candidate)
    k = min(k, len(reference) - 1)
    return Agreement(
        images=len(reference),
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        k=k,
        top_k_overlap=top_k_overlap(reference, reference, candidate, k),
    )


def interleaved_latency_ms(runners: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time in ms of each zero-argument ``runner``, timed in turn (order rotated every repeat)."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            runners[name]()
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}
