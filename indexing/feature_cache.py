"""Multi-scale features of benchmark images, cached on disk as ``.npy`` so a re-run skips the model.

Landmark benchmarks (Revisited Oxford/Paris, +R1M) are evaluated many times with the same encoder:
once per protocol variant, and in the asymmetric setting once per student against the same teacher
database. Extraction dominates those runs, so each (dataset side, encoder) pair is embedded once and
kept in a cache directory. A cache file is named by everything that determines its content:

    <dataset>-<side>-enc<encoder id>-<fingerprint>-s<scales>-max<max side>-<format>.npy

where the fingerprint identifies what was embedded (e.g. the ground-truth file's hash for queries and
database, the file list for distractors) and the format tag changes whenever
:mod:`indexing.multiscale` changes what it computes, so a stale file is never reused. A file of the
wrong shape (another dimension, another number of rows) is ignored and replaced. Files are written
atomically; a crash never leaves a half-written cache behind.

:class:`MultiscaleFeatures` combines the cache with :func:`indexing.multiscale.extract_multiscale`:
the model of a checkpoint is loaded only on a cache miss, and once per checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.index_dir import file_sha256
from retrieval.atomic import atomic_file
from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.images import SkipReport

__all__ = [
    "CACHE_FORMAT",
    "CachedFeatures",
    "FeatureCache",
    "FeatureKey",
    "MultiscaleFeatures",
    "file_fingerprint",
    "names_fingerprint",
]

CACHE_FORMAT = "ms1"
"""Bump when :mod:`indexing.multiscale` changes what it computes, so old caches are not reused."""
_FINGERPRINT_CHARS = 12


def file_fingerprint(path: str | Path) -> str:
    """A short content hash of a file (e.g. a ground-truth pickle): a new release gets a new cache entry."""
    return file_sha256(path)[:_FINGERPRINT_CHARS]


def names_fingerprint(names: Sequence[str]) -> str:
    """A short hash of an ordered list of names (e.g. distractor files): another list is another entry."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:_FINGERPRINT_CHARS]


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines the content of one cached feature file.

    Attributes:
        dataset: the benchmark's name, e.g. ``"roxford5k"``.
        side: which images: ``"query"``, ``"db"``, ``"distractors"``...
        encoder_id: the id of the checkpoint that embeds them.
        fingerprint: identifies the list of images (see :func:`file_fingerprint`, :func:`names_fingerprint`).
        scales: the multi-scale factors.
        max_side: the long-side cap before scaling, in pixels.
    """

    dataset: str
    side: str
    encoder_id: str
    fingerprint: str
    scales: tuple[float, ...]
    max_side: int

    @property
    def filename(self) -> str:
        """The cache file's name (see the module docstring)."""
        scales = "_".join(f"{s:g}" for s in self.scales)
        return (
            f"{self.dataset}-{self.side}-enc{self.encoder_id}-{self.fingerprint}"
            f"-s{scales}-max{self.max_side}-{CACHE_FORMAT}.npy"
        )


@dataclass(frozen=True)
class FeatureCache:
    """A directory of cached ``(N, D)`` float32 feature arrays, one ``.npy`` per :class:`FeatureKey`."""

    directory: Path

    def path(self, key: FeatureKey) -> Path:
        """Where the features of ``key`` are (or would be) stored."""
        return Path(self.directory) / key.filename

    def load(self, key: FeatureKey, dim: int, rows: int | None = None) -> np.ndarray | None:
        """The cached array if it exists and has ``dim`` columns (and ``rows`` rows when given), else ``None``.

        ``None`` means "extract again": a missing, unreadable or mis-shaped file is treated alike, and is
        replaced by the next :meth:`save`. The file is read without unpickling.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim:
            return None
        if rows is not None and len(array) != rows:
            return None
        return np.ascontiguousarray(array, dtype=np.float32)

    def save(self, key: FeatureKey, array: np.ndarray) -> Path:
        """Write ``array`` as float32 ``.npy`` for ``key`` atomically (never a half-written cache); return its path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32))
        return path


@dataclass(frozen=True, eq=False)
class CachedFeatures:
    """Features of one dataset, from the cache or a fresh extraction.

    Attributes:
        embeddings: ``(M, D)`` float32 L2-normalised features of the kept items, in dataset order.
        num_skipped: items left out as unreadable (``len(dataset) - M``).
        skipped: which items, with the reason; empty on a cache hit (the cache stores no names).
        loaded: the cache file read, or ``None``.
        written: the cache file written, or ``None``.
    """

    embeddings: np.ndarray
    num_skipped: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)
    loaded: str | None = None
    written: str | None = None


@dataclass
class MultiscaleFeatures:
    """Multi-scale features of datasets by encoder checkpoints, through an optional :class:`FeatureCache`.

    One instance serves a whole evaluation (symmetric or asymmetric): each checkpoint's model is loaded
    at the first cache miss that needs it, then reused, and never when every side is cached.

    Attributes:
        scales: multi-scale factors (see :func:`indexing.multiscale.extract_multiscale`).
        max_side: long-side cap, in pixels.
        batch_size: images per forward pass.
        device: torch device.
        num_workers: DataLoader worker processes decoding images.
        progress: show progress bars.
        cache: where features are cached, or ``None`` to always extract.
    """

    scales: tuple[float, ...]
    max_side: int
    batch_size: int = 16
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True
    cache: FeatureCache | None = None
    _models: dict[Path, Any] = field(default_factory=dict, repr=False)

    def key(self, dataset: str, side: str, encoder_id: str, fingerprint: str) -> FeatureKey:
        """The cache key of one side embedded by one encoder with these extraction settings."""
        return FeatureKey(dataset, side, encoder_id, fingerprint, tuple(self.scales), self.max_side)

    def features(
        self,
        checkpoint: Path,
        dataset: LabelledImageDataset,
        key: FeatureKey,
        dim: int,
        *,
        complete: bool = True,
    ) -> CachedFeatures:
        """Features of ``dataset`` by the encoder at ``checkpoint`` (whose id is ``key.encoder_id``).

        Args:
            checkpoint: encoder checkpoint directory, loaded only on a cache miss.
            dataset: the images, embedded in order.
            key: the cache key (see :meth:`key`).
            dim: the encoder's embedding size, to validate a cached file.
            complete: row ``i`` must be item ``i`` (a ground truth refers to images by position). A cached
                file must then have ``len(dataset)`` rows, and an extraction that skipped images is
                returned *without* being cached, for the caller to refuse. Without it, unreadable items
                are left out (and counted) and the result is cached as it is.
        """
        cached = self.cache.load(key, dim, len(dataset) if complete else None) if self.cache is not None else None
        if cached is not None:
            return CachedFeatures(cached, num_skipped=len(dataset) - len(cached), loaded=key.filename)
        extraction = self._extract(checkpoint, dataset)
        result = CachedFeatures(extraction.embeddings, num_skipped=len(extraction.skipped), skipped=extraction.skipped)
        if self.cache is None or (complete and len(extraction.skipped)):
            return result
        self.cache.save(key, extraction.embeddings)
        return CachedFeatures(result.embeddings, result.num_skipped, result.skipped, written=key.filename)

    def _extract(self, checkpoint: Path, dataset: LabelledImageDataset) -> Any:
        # Looked up at call time (not imported at module level) so that torch loads only on a cache miss.
        from indexing.multiscale import extract_multiscale
        from models import load_encoder

        if checkpoint not in self._models:
            self._models[checkpoint] = load_encoder(checkpoint, device=self.device)
        return extract_multiscale(
            self._models[checkpoint],
            dataset,
            scales=self.scales,
            max_side=self.max_side,
            batch_size=self.batch_size,
            device=self.device,
            num_workers=self.num_workers,
            progress=self.progress,
        )
