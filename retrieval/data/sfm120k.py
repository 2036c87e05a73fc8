"""Loader for the SfM-120k landmark training set (Radenović et al., cirtorch), read from the official release.

Layout of a dataset root, as the cirtorch download leaves it (``data/train/retrieval-SfM-120k/``)::

    ROOT/retrieval-SfM-120k.pkl          the official training layout (see below)
    ROOT/ims/<c[-2:]>/<c[-4:-2]>/<c[-6:-4]>/<c>   the image of cid ``c`` (cirtorch ``cid2filename``; no extension)

``ROOT`` may also be the folder above it (``ROOT/retrieval-SfM-120k/retrieval-SfM-120k.pkl``). The
30k variant (``retrieval-SfM-30k``) has the same format and opens with ``name="retrieval-SfM-30k"``.

The layout ships only as a Python pickle: a dict ``{"train": {...}, "val": {...}}`` whose splits hold
``cids`` (one image id per image), ``cluster`` (the 3D-reconstruction cluster of each image: the class),
and ``qidxs`` / ``pidxs``, the official (query, positive) image pairs as positions in ``cids``. This
pickle is, with the Revisited ground truth, one of the official-benchmark exceptions to "never
unpickle": it is read only through :func:`retrieval.data.safe_pickle.read_restricted_pickle`, which
rebuilds plain containers, strings, numbers and numpy arrays and refuses any other global, so a
tampered file is refused instead of executed.

The dataset has one label level, ``fine`` = cluster id, and keeps the official pairs in
``query_indices`` / ``positive_indices`` so that a miner (AML distillation, cirtorch-style tuple
mining) can start from the official positives rather than from label agreement alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.datasets import DatasetError, FileImageDataset, Transform, _encode_rows
from retrieval.data.labels import LabelSchema
from retrieval.data.safe_pickle import find_release_pickle, read_restricted_pickle

__all__ = ["SFM120K", "SFM120K_LEVEL", "SFM_SPLITS", "Sfm120kDataset", "cid_to_path", "open_sfm120k"]

SFM120K = "retrieval-SfM-120k"
SFM120K_LEVEL = "fine"  # the single label level: class = reconstruction cluster
SFM_SPLITS: tuple[str, ...] = ("train", "val")
_SPLIT_KEYS = ("cids", "cluster", "qidxs", "pidxs")


def cid_to_path(images_root: str | Path, cid: str) -> Path:
    """Where the SfM-120k release stores image ``cid``: ``<images_root>/<c[-2:]>/<c[-4:-2]>/<c[-6:-4]>/<c>``.

    This is cirtorch's ``cid2filename``; the files carry no extension (they are decoded by content).

    Raises:
        ValueError: a cid shorter than the six characters the three folder levels need, or one that
            could leave ``images_root`` (a path separator, or a leading dot).
    """
    if len(cid) < 6 or any(sep in cid for sep in ("/", "\\")) or cid.startswith("."):
        raise ValueError(f"image id {cid!r} does not fit the SfM-120k layout <c[-2:]>/<c[-4:-2]>/<c[-6:-4]>/<c>")
    return Path(images_root) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


class Sfm120kDataset(FileImageDataset):
    """One split of SfM-120k: images labelled by their reconstruction cluster, plus the official pairs.

    Build it with :func:`open_sfm120k`. ``names`` are the images' absolute file paths.

    Attributes:
        pkl_path: the layout pickle that was read.
        split: ``"train"`` or ``"val"``.
        cids: the image ids, in dataset order.
        clusters: ``(N,)`` int64 cluster id of each image, as in the pickle (``labels[:, 0]`` holds the
            same classes renumbered in first-seen order; ``vocab`` maps them back to these ids as text).
        query_indices: ``(P,)`` int64 positions of the official query images (``qidxs``).
        positive_indices: ``(P,)`` int64 positions of their official positives (``pidxs``), pair-aligned.
            Both are positions in this dataset: a :meth:`subset` view renumbers them and keeps only the
            pairs whose two images it contains, so a miner can trust them on any view.
    """

    def __init__(
        self,
        pkl_path: Path,
        split: str,
        images_root: Path,
        cids: list[str],
        clusters: np.ndarray,
        query_indices: np.ndarray,
        positive_indices: np.ndarray,
        transform: Transform | None = None,
    ) -> None:
        schema = LabelSchema((SFM120K_LEVEL,))
        vocab, labels = _encode_rows(schema, [[str(int(c))] for c in clusters])
        paths = [os.path.abspath(cid_to_path(images_root, cid)) for cid in cids]
        super().__init__(schema, vocab, labels, paths, transform)
        self.pkl_path = pkl_path
        self.split = split
        self.cids = list(cids)
        self.clusters = clusters
        self.query_indices = query_indices
        self.positive_indices = positive_indices

    def subset(self, indices: Sequence[int] | np.ndarray) -> Sfm120kDataset:
        """A view of the items at ``indices``, with cids, clusters and the official pairs following it.

        A pair survives when both its images are in the view; its positions become view positions (the
        first occurrence, should ``indices`` repeat an item).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        view = super().subset(idx)
        assert isinstance(view, Sfm120kDataset)
        idx = np.where(idx < 0, idx + len(self), idx)
        view.cids = [self.cids[int(i)] for i in idx]
        view.clusters = self.clusters[idx]
        position = np.full(len(self), -1, dtype=np.int64)
        position[idx[::-1]] = np.arange(len(idx) - 1, -1, -1, dtype=np.int64)  # first occurrence wins
        queries, positives = position[self.query_indices], position[self.positive_indices]
        keep = (queries >= 0) & (positives >= 0)
        view.query_indices, view.positive_indices = queries[keep], positives[keep]
        return view


def open_sfm120k(
    root: str | Path,
    split: str = "train",
    *,
    name: str = SFM120K,
    require_images: bool = True,
    transform: Transform | None = None,
) -> Sfm120kDataset:
    """Open one split of SfM-120k (or SfM-30k) from ``root`` (or ``root/<name>/``).

    Args:
        root: the folder holding ``<name>.pkl`` and ``ims/``, or its parent.
        split: ``"train"`` or ``"val"``.
        name: the release name, which is also the pickle's stem.
        require_images: fail when the ``ims/`` folder is missing. Pass ``False`` to read the layout alone;
            images then fail only if read (a missing file fails when read, naming it).
        transform: see :class:`~retrieval.data.datasets.LabelledImageDataset`.

    Raises:
        DatasetError: a missing pickle or image folder (naming the paths tried), a pickle that is not the
            official layout (not a dict of splits, a missing split or key, lengths that disagree, a cid
            that does not fit the layout, pair positions out of range), or one that names a forbidden
            global (refused, never run).
    """
    if split not in SFM_SPLITS:
        raise DatasetError(f"unknown SfM-120k split {split!r}; valid splits: {', '.join(SFM_SPLITS)}")
    pkl_path = find_release_pickle(root, name, f"{name}.pkl", "layout", "download it with the cirtorch scripts")
    images_root = pkl_path.parent / "ims"
    if require_images and not images_root.is_dir():
        raise DatasetError(f"{name} image folder not found: {images_root} (expected ims/ beside {pkl_path})")
    raw = read_restricted_pickle(pkl_path, name)
    cids, clusters, queries, positives = _parse_split(pkl_path, raw, split)
    return Sfm120kDataset(pkl_path, split, images_root, cids, clusters, queries, positives, transform)


def _parse_split(path: Path, raw: Any, split: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Check one split's structure; return its cids, clusters, query positions and positive positions."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a dict of splits ({', '.join(SFM_SPLITS)}), got {type(raw).__name__}")
    if split not in raw:
        raise DatasetError(f"{path}: no {split!r} split (splits: {', '.join(map(str, raw)) or 'none'})")
    entry = raw[split]
    where = f"{path}: split {split!r}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected a dict with keys {', '.join(_SPLIT_KEYS)}, got {type(entry).__name__}")
    missing = [key for key in _SPLIT_KEYS if key not in entry]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)} (keys: {', '.join(map(str, entry))})")
    cids = _cids(where, entry["cids"])
    clusters = _integers(where, entry["cluster"], "cluster")
    if len(clusters) != len(cids):
        raise DatasetError(f"{where}: 'cluster' has {len(clusters)} entries for {len(cids)} cids")
    queries = _integers(where, entry["qidxs"], "qidxs")
    positives = _integers(where, entry["pidxs"], "pidxs")
    if len(queries) != len(positives):
        raise DatasetError(f"{where}: 'qidxs' has {len(queries)} entries but 'pidxs' {len(positives)}; they pair up")
    for key, positions in (("qidxs", queries), ("pidxs", positives)):
        if len(positions) and (positions.min() < 0 or positions.max() >= len(cids)):
            raise DatasetError(f"{where}: {key!r} holds positions outside [0, {len(cids)}) (the number of cids)")
    return cids, clusters, queries, positives


def _cids(where: str, value: Any) -> list[str]:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "U":
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(c, str) for c in value):
        raise DatasetError(f"{where}: 'cids' must be a list of image ids (strings)")
    if not value:
        raise DatasetError(f"{where}: 'cids' is empty")
    for cid in value:
        try:
            cid_to_path(".", cid)
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    return list(value)


def _integers(where: str, value: Any, key: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = np.asarray(None)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{where}: {key!r} must be a 1-D list of integers")
    return array.astype(np.int64)
