"""The frozen teacher's embeddings of the training images, computed once and kept on disk.

Distillation looks the teacher up for every query, positive and mined negative of every step; running the
teacher (a ResNet101 at 512 px, say) inside the loop would cost more than the student's own step. Its
embeddings never change, so they are computed once and memory-mapped::

    <cache_dir>/<teacher_id>-<data fingerprint>/
        embeddings.npy      float32 (N, D), row i = the teacher's embedding of training image i
        meta.json           teacher id, data fingerprint, count, dimension, teacher path, date

The entry name is the key: another teacher or other training data get another entry. An entry handed over
explicitly (``distill.teacher_embeddings``) is checked against the run's teacher and data, and another
teacher's cache is refused with both ids named. Entries are written atomically, so a killed run leaves no
half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from retrieval.atomic import atomic_directory
from retrieval.data.datasets import LabelledImageDataset
from retrieval.errors import UserFacingError

__all__ = ["TeacherCache", "TeacherCacheError", "data_fingerprint", "open_teacher_cache"]

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "meta.json"


class TeacherCacheError(UserFacingError, ValueError):
    """A teacher-embedding cache that belongs to another teacher or other data, or cannot be read."""


@dataclass(frozen=True)
class TeacherCache:
    """An opened cache entry: ``embeddings[i]`` is the teacher's view of training image ``i``."""

    path: Path
    teacher_id: str
    fingerprint: str
    embeddings: np.ndarray  # memory-mapped copy-on-write: the file is never written

    def __len__(self) -> int:
        return len(self.embeddings)


def data_fingerprint(dataset: LabelledImageDataset, preprocess_json: str) -> str:
    """A short hash of the training items (names and labels, in order) and the teacher's preprocessing.

    Two runs over the same images in the same order with the same teacher input pipeline share a cache; any
    change of images, order, labels or input size gives another key.
    """
    digest = hashlib.sha256()
    digest.update(preprocess_json.encode())
    for name in dataset.names:
        digest.update(name.encode() + b"\0")
    digest.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def open_teacher_cache(
    teacher_id: str,
    fingerprint: str,
    count: int,
    compute: Callable[[], np.ndarray],
    *,
    cache_dir: Path,
    explicit: Path | None = None,
    teacher_path: str = "",
) -> TeacherCache:
    """Open the cache entry for ``(teacher_id, fingerprint)``, computing and writing it first if absent.

    Args:
        teacher_id: the teacher encoder's id.
        fingerprint: :func:`data_fingerprint` of the training data.
        count: the number of training images (the entry's row count).
        compute: returns the ``(count, D)`` float32 embeddings when the entry must be built.
        cache_dir: where keyed entries live.
        explicit: an entry directory to use instead of the keyed one (never recomputed).
        teacher_path: recorded in the entry's metadata, for people reading it.

    Raises:
        TeacherCacheError: ``explicit`` is missing or belongs to another teacher or other data; an entry with
            a wrong row count or dimension.
    """
    if explicit is not None:
        return _open_entry(Path(explicit), teacher_id, fingerprint, count)
    entry = Path(cache_dir) / f"{teacher_id}-{fingerprint}"
    if (entry / META_FILE).is_file():
        logger.info("teacher embeddings from the cache %s", entry)
        return _open_entry(entry, teacher_id, fingerprint, count)
    embeddings = np.ascontiguousarray(compute(), dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != count:
        raise TeacherCacheError(f"the teacher produced {embeddings.shape} embeddings for {count} training images")
    meta = {
        "teacher_id": teacher_id,
        "data_fingerprint": fingerprint,
        "count": count,
        "dim": int(embeddings.shape[1]),
        "teacher_path": teacher_path,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_directory(entry) as tmp:
        np.save(tmp / EMBEDDINGS_FILE, embeddings)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("teacher embeddings of %d images cached in %s", count, entry)
    return _open_entry(entry, teacher_id, fingerprint, count)


def _open_entry(entry: Path, teacher_id: str, fingerprint: str, count: int) -> TeacherCache:
    try:
        meta = json.loads((entry / META_FILE).read_text())
        cached_teacher, cached_data = str(meta["teacher_id"]), str(meta["data_fingerprint"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TeacherCacheError(f"{entry} is not a teacher-embedding cache ({META_FILE}: {exc})") from None
    if cached_teacher != teacher_id:
        raise TeacherCacheError(
            f"the teacher-embedding cache {entry} was computed by teacher {cached_teacher}, but this run's teacher "
            f"is {teacher_id}; point distill.teacher_embeddings elsewhere or leave it unset to compute a new cache"
        )
    if cached_data != fingerprint:
        raise TeacherCacheError(
            f"the teacher-embedding cache {entry} holds other training data (fingerprint {cached_data}, this run's "
            f"is {fingerprint}); leave distill.teacher_embeddings unset to compute a cache for this data"
        )
    try:
        # copy-on-write: pages are read lazily and the file never changes (and torch can view the array)
        embeddings = np.load(entry / EMBEDDINGS_FILE, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TeacherCacheError(f"cannot read {entry / EMBEDDINGS_FILE}: {exc}") from None
    if embeddings.ndim != 2 or len(embeddings) != count or embeddings.dtype != np.float32:
        raise TeacherCacheError(
            f"{entry / EMBEDDINGS_FILE} holds {embeddings.dtype} {embeddings.shape}; expected float32 rows for "
            f"{count} training images"
        )
    return TeacherCache(entry, teacher_id, fingerprint, embeddings)
