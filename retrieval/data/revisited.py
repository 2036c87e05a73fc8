"""Loader for Revisited Oxford and Paris (ROxford5k, RParis6k), read from the official release.

Layout of a dataset root, as the revisitop download scripts leave it (``data/datasets/roxford5k/``)::

    ROOT/gnd_roxford5k.pkl      the official ground truth (see below)
    ROOT/jpg/<name>.jpg         every query and database image

``ROOT`` may also be the folder above it (``ROOT/roxford5k/gnd_roxford5k.pkl``), so one ``--data-root``
serves both datasets.

The ground truth ships only as a Python pickle: a dict with ``imlist`` (database image names),
``qimlist`` (query image names; the 70 queries are not in the database) and ``gnd``, one dict per
query with its bounding box ``bbx`` ``[x1, y1, x2, y2]`` and the database indices of its ``easy``,
``hard`` and ``junk`` images. Unpickling runs code named by the file, so this module reads it through
the restricted unpickler of :mod:`retrieval.data.safe_pickle`, which resolves nothing but numpy's array
reconstruction: a tampered file is refused instead of executed. The official benchmark pickles (this one
and SfM-120k's) are the only files the project unpickles, all through that module.

Queries are cropped to their box before embedding, as the protocol requires (see
:class:`RevisitedImageDataset` for the rounding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.data.datasets import DatasetError, FileImageDataset, Transform
from retrieval.data.images import CorruptImageError
from retrieval.data.labels import LabelSchema, LabelVocabulary
from retrieval.data.safe_pickle import find_release_pickle, read_restricted_pickle

__all__ = [
    "REVISITED_DATASETS",
    "QueryGroundTruth",
    "RevisitedDataset",
    "RevisitedImageDataset",
    "open_revisited",
]

REVISITED_DATASETS: tuple[str, ...] = ("roxford5k", "rparis6k")
_LEVEL = "image"  # the single, dummy label level: the protocol's relevance comes from the ground truth
_GND_KEYS = ("imlist", "qimlist", "gnd")
_QUERY_KEYS = ("bbx", "easy", "hard", "junk")


@dataclass(frozen=True, eq=False)
class QueryGroundTruth:
    """The official relevance judgements of one query, as database indices.

    Attributes:
        easy: ``(E,)`` int64 indices of the easy positives.
        hard: ``(H,)`` int64 indices of the hard positives.
        junk: ``(J,)`` int64 indices of the images that count neither way (removed from the ranking).
    """

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


class RevisitedImageDataset(FileImageDataset):
    """Images ``jpg/<name>.jpg`` of one side (queries or database), optionally cropped to a box each.

    Every item has the label 0 of a single dummy level: relevance in this benchmark comes from
    :class:`QueryGroundTruth`, not from classes.

    Cropping rounds the box *outward* to whole pixels: ``floor(x1), floor(y1)`` to
    ``ceil(x2), ceil(y2)`` (end exclusive), clipped to the image. The official Python example crops with
    PIL, which rounds each edge to the nearest pixel, and the official MATLAB code keeps the nearest
    pixel *including* the end row and column; both differ from this by at most one pixel per edge.
    Outward rounding never cuts off any part of the annotated object.

    Args:
        paths: one image file per item.
        boxes: ``(N, 4)`` float boxes ``[x1, y1, x2, y2]`` in pixels, or ``None`` for whole images.
        transform: see :class:`~retrieval.data.datasets.LabelledImageDataset`.
    """

    def __init__(
        self, paths: Sequence[Path], boxes: np.ndarray | None = None, transform: Transform | None = None
    ) -> None:
        schema = LabelSchema((_LEVEL,))
        vocab = LabelVocabulary(schema)
        vocab.encode(["0"])
        labels = np.zeros((len(paths), 1), dtype=np.int64)
        if boxes is not None and np.shape(boxes) != (len(paths), 4):
            raise DatasetError(f"boxes must have shape ({len(paths)}, 4), got {np.shape(boxes)}")
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64)
        super().__init__(schema, vocab, labels, paths, transform)

    def _load_row(self, row: int) -> Image.Image:
        image = super()._load_row(row)
        if self.boxes is None:
            return image
        box = crop_box(self.boxes[row], image.size)
        if box is None:
            raise CorruptImageError(
                str(self.paths[row]), f"bounding box {list(self.boxes[row])} lies outside the {image.size} image"
            )
        return image.crop(box)


def crop_box(bbx: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The whole-pixel crop ``(left, top, right, bottom)`` of a float box, rounded outward and clipped.

    Returns ``None`` when nothing of the box lies inside an image of ``size`` (width, height).
    """
    width, height = size
    left = max(0, math.floor(bbx[0]))
    top = max(0, math.floor(bbx[1]))
    right = min(width, math.ceil(bbx[2]))
    bottom = min(height, math.ceil(bbx[3]))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


@dataclass(frozen=True, eq=False)
class RevisitedDataset:
    """One Revisited benchmark: cropped queries, the database, and the per-query ground truth.

    Attributes:
        name: ``"roxford5k"`` or ``"rparis6k"``.
        root: the folder holding the ground-truth pickle and ``jpg/``.
        queries: the query images, cropped to their boxes (``len == len(ground_truth)``).
        database: the database images, in the order the ground-truth indices refer to.
        ground_truth: one entry per query, indices into ``database``.
        gnd_path: the ground-truth pickle that was read.
    """

    name: str
    root: Path
    queries: RevisitedImageDataset
    database: RevisitedImageDataset
    ground_truth: list[QueryGroundTruth]
    gnd_path: Path


def open_revisited(name: str, data_root: str | Path, *, require_images: bool = True) -> RevisitedDataset:
    """Open ROxford5k or RParis6k from ``data_root`` (or ``data_root/<name>/``).

    This function is one of the project's exceptions to "never unpickle" (with the SfM-120k loader): the
    official ground truth ``gnd_<name>.pkl`` exists only as a pickle (it is the benchmark's official
    format), so it is read with :func:`retrieval.data.safe_pickle.read_restricted_pickle`, whose unpickler
    accepts plain containers, numbers, strings and numpy arrays and refuses any other global (so a
    tampered file cannot run code).

    Args:
        name: ``"roxford5k"`` or ``"rparis6k"``.
        data_root: the folder holding ``gnd_<name>.pkl`` and ``jpg/``, or its parent.
        require_images: fail when the ``jpg/`` folder is missing. Pass ``False`` to read the ground
            truth alone (scoring saved features); images then fail only if read.

    Returns:
        The dataset, with images decoded lazily (a missing image file fails when read, naming it).

    Raises:
        DatasetError: an unknown name, a missing pickle or image folder (the message lists the paths
            tried), or a malformed pickle (missing keys, wrong types, boxes or indices out of range).
    """
    if name not in REVISITED_DATASETS:
        raise DatasetError(f"unknown Revisited dataset {name!r}; valid names: {', '.join(REVISITED_DATASETS)}")
    gnd_path = find_release_pickle(
        data_root, name, f"gnd_{name}.pkl", "ground truth", "download it with the revisitop scripts"
    )
    root = gnd_path.parent
    images = root / "jpg"
    if require_images and not images.is_dir():
        raise DatasetError(f"{name} image folder not found: {images} (expected jpg/<name>.jpg beside {gnd_path})")
    imlist, qimlist, boxes, ground_truth = _parse_ground_truth(gnd_path, _read_ground_truth_pickle(gnd_path))
    database = RevisitedImageDataset([Path(os.path.abspath(images / f"{n}.jpg")) for n in imlist])
    queries = RevisitedImageDataset([Path(os.path.abspath(images / f"{n}.jpg")) for n in qimlist], boxes)
    return RevisitedDataset(name, root, queries, database, ground_truth, gnd_path)


def _read_ground_truth_pickle(path: Path) -> Any:
    """Unpickle the official ground truth with the restricted unpickler (see :func:`open_revisited`)."""
    return read_restricted_pickle(path, "ground-truth")


def _parse_ground_truth(path: Path, raw: Any) -> tuple[list[str], list[str], np.ndarray, list[QueryGroundTruth]]:
    """Check the pickle's structure; return database names, query names, ``(Q, 4)`` boxes and the judgements."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a dict with keys {', '.join(_GND_KEYS)}, got {type(raw).__name__}")
    missing = [key for key in _GND_KEYS if key not in raw]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)} (keys: {', '.join(map(str, raw))})")
    imlist = _names(path, raw["imlist"], "imlist")
    qimlist = _names(path, raw["qimlist"], "qimlist")
    gnd = raw["gnd"]
    if not isinstance(gnd, list | tuple) or len(gnd) != len(qimlist):
        size = len(gnd) if isinstance(gnd, list | tuple) else type(gnd).__name__
        raise DatasetError(f"{path}: 'gnd' must be a list with one entry per query ({len(qimlist)}), got {size}")
    boxes = np.zeros((len(gnd), 4), dtype=np.float64)
    judgements = []
    for q, entry in enumerate(gnd):
        where = f"{path}: gnd[{q}] ({qimlist[q]})"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a dict, got {type(entry).__name__}")
        missing = [key for key in _QUERY_KEYS if key not in entry]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
        boxes[q] = _box(where, entry["bbx"])
        easy, hard, junk = (_indices(where, entry[key], key, len(imlist)) for key in ("easy", "hard", "junk"))
        judgements.append(QueryGroundTruth(easy=easy, hard=hard, junk=junk))
    return imlist, qimlist, boxes, judgements


def _names(path: Path, value: Any, key: str) -> list[str]:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "U":
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(n, str) and n for n in value):
        raise DatasetError(f"{path}: {key!r} must be a list of image names (non-empty strings)")
    if not value:
        raise DatasetError(f"{path}: {key!r} is empty")
    return list(value)


def _box(where: str, value: Any) -> np.ndarray:
    try:
        box = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: 'bbx' must be 4 numbers [x1, y1, x2, y2], got {value!r}") from None
    if box.shape != (4,) or not np.isfinite(box).all():
        raise DatasetError(f"{where}: 'bbx' must be 4 finite numbers [x1, y1, x2, y2], got {value!r}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{where}: 'bbx' {box.tolist()} is empty (x2 <= x1 or y2 <= y1)")
    return box


def _indices(where: str, value: Any, key: str, size: int) -> np.ndarray:
    array = np.asarray(value)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    floats = array.ndim == 1 and np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all()
    if floats and (array == np.round(array)).all():  # whole numbers stored as floats (e.g. converted from MATLAB)
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{where}: {key!r} must be a 1-D list of integer database indices")
    if array.min() < 0 or array.max() >= size:
        raise DatasetError(f"{where}: {key!r} holds indices outside [0, {size}) (the database size)")
    return array.astype(np.int64)
