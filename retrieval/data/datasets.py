"""Labelled image datasets: a CSV of paths, a folder of class folders, or images held in memory.

Every dataset exposes the same few things the stages rely on: an ``(N, L)`` int64 label array whose
columns follow a :class:`~retrieval.data.labels.LabelSchema` (finest level first), the vocabulary that
maps those ids back to class names, a name per item (its file path, or a display name), and a
settable ``transform``. Images are decoded lazily, so opening a dataset of a million files is cheap
and a corrupt file only fails when (and where) it is read, with an error that names it.
"""

from __future__ import annotations

import copy
import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval.data.images import load_image as _load_image_file
from retrieval.data.labels import DEFAULT_LEVELS, LabelSchema, LabelVocabulary
from retrieval.errors import UserFacingError

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNLABELLED",
    "CsvImageDataset",
    "DatasetError",
    "FileImageDataset",
    "ImageFolderDataset",
    "InMemoryImageDataset",
    "LabelledImageDataset",
    "label_columns",
    "open_dataset",
    "read_csv_records",
    "record_path",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
UNLABELLED = "unlabelled"  # class of images lying directly in an image folder's root

Transform = Callable[[Image.Image], Any]


class DatasetError(UserFacingError, ValueError):
    """A dataset description (CSV, folder, arrays) that cannot be used; the message names the file or field."""


class LabelledImageDataset(Dataset):
    """Base class: lazily loaded images with ``(N, L)`` hierarchical labels.

    Subclasses implement :meth:`_load_row`, which reads the image of one underlying row. The base class
    keeps a row map so that :meth:`subset` and :meth:`with_transform` are cheap views sharing the data.

    Attributes:
        schema: the label levels, finest first.
        vocab: class names per level; ``labels[:, k]`` indexes ``vocab.names[k]``.
        labels: int64 array ``(N, L)``.
        names: one string per item: its file path (file datasets) or a display name (in-memory).
        transform: applied by ``__getitem__`` to the PIL image; ``None`` returns the PIL image itself.
    """

    def __init__(
        self,
        schema: LabelSchema,
        vocab: LabelVocabulary,
        labels: np.ndarray,
        names: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.ndim != 2 or labels.shape[1] != schema.num_levels:
            raise DatasetError(
                f"labels must have shape (N, {schema.num_levels}) for levels {schema.levels}, got {labels.shape}"
            )
        if len(names) != len(labels):
            raise DatasetError(f"got {len(names)} names for {len(labels)} label rows")
        if vocab.schema != schema:
            raise DatasetError(f"vocabulary levels {vocab.schema.levels} differ from dataset levels {schema.levels}")
        labels = labels.astype(np.int64, copy=False)
        for k, level in enumerate(schema.levels):
            if len(labels) and (labels[:, k].min() < 0 or labels[:, k].max() >= vocab.num_classes(k)):
                raise DatasetError(f"{level} labels must lie in [0, {vocab.num_classes(k)}) (the vocabulary size)")
        self.schema = schema
        self.vocab = vocab
        self.labels = labels
        self.names = list(names)
        self.transform = transform
        self._rows = np.arange(len(labels), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def _load_row(self, row: int) -> Image.Image:
        raise NotImplementedError

    def load_image(self, i: int) -> Image.Image:
        """Decode item ``i`` as an RGB PIL image.

        Raises:
            CorruptImageError: the file is missing, empty, truncated or not an image.
        """
        return self._load_row(int(self._rows[i]))

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.labels[i].copy())

    def label_names(self, i: int) -> dict[str, str]:
        """Class names of item ``i``, one per level (``{"fine": ..., "middle": ..., "coarse": ...}``)."""
        return self.vocab.decode(self.labels[i])

    def level_labels(self, level: str | int) -> np.ndarray:
        """The ``(N,)`` label column of one level (what a per-level sampler or metric needs)."""
        k = self.schema.index(level) if isinstance(level, str) else int(level)
        return self.labels[:, k]

    def with_transform(self, transform: Transform | None) -> LabelledImageDataset:
        """A view sharing images and labels but applying another transform (train vs eval pipelines)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImageDataset:
        """A view of the items at ``indices`` (same vocabulary, so class ids keep their meaning)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)} items")
        view = copy.copy(self)
        view._rows = self._rows[idx]
        view.labels = self.labels[idx]
        view.names = [self.names[int(i)] for i in idx]
        return view

    def __repr__(self) -> str:
        counts = ", ".join(f"{lvl}={len(np.unique(self.labels[:, k]))}" for k, lvl in enumerate(self.schema.levels))
        return f"{type(self).__name__}(items={len(self)}, classes: {counts})"


class FileImageDataset(LabelledImageDataset):
    """A dataset whose items are image files: ``paths[row]`` is decoded when the item is read.

    The CSV, folder, DyML, landmark and Revisited datasets differ only in how they find their files and
    labels; reading a file (and naming it in errors) is this one piece.

    Attributes:
        paths: one file per underlying row (``names`` holds the same paths as text and follows views).
    """

    def __init__(
        self,
        schema: LabelSchema,
        vocab: LabelVocabulary,
        labels: np.ndarray,
        paths: Sequence[str | Path],
        transform: Transform | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        super().__init__(schema, vocab, labels, [str(p) for p in self.paths], transform)

    def _load_row(self, row: int) -> Image.Image:
        return _load_image_file(self.paths[row])


def _encode_rows(schema: LabelSchema, rows: Sequence[Sequence[str]]) -> tuple[LabelVocabulary, np.ndarray]:
    vocab = LabelVocabulary(schema)
    labels = np.array([vocab.encode(row) for row in rows], dtype=np.int64).reshape(len(rows), schema.num_levels)
    return vocab, labels


def read_csv_records(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and non-blank ``(line number, row)`` records of a UTF-8 CSV that must have a ``path`` column.

    Raises:
        DatasetError: unreadable CSV, no header, no ``path`` column, a row with surplus cells, or no rows.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            records = []
            for rec in reader:
                if None in rec:  # DictReader files surplus cells under the key None
                    raise DatasetError(f"{csv_path}, line {reader.line_num}: more cells than header columns")
                if any((v or "").strip() for v in rec.values()):  # skip blank lines
                    records.append((reader.line_num, rec))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: not a readable UTF-8 CSV ({exc})") from None
    if not header:
        raise DatasetError(f"{csv_path}: empty file (expected a header row with 'path' and label columns)")
    if "path" not in header:
        raise DatasetError(f"{csv_path}: missing column 'path' (columns: {', '.join(header)})")
    if not records:
        raise DatasetError(f"{csv_path}: no rows after the header")
    return header, records


def label_columns(
    csv_path: Path, header: list[str], levels: Sequence[str] | None, *, required: bool = True
) -> list[str]:
    """The label columns of a CSV: ``levels`` (all present), else those of fine/middle/coarse in the header.

    Args:
        required: at least one label column must result (training data); a gallery may have none.

    Raises:
        DatasetError: a named level missing from the header, or no label column where one is required.
    """
    if levels is None:
        found = [level for level in DEFAULT_LEVELS if level in header]
        if required and not found:
            raise DatasetError(
                f"{csv_path}: no label column; expected at least one of {', '.join(DEFAULT_LEVELS)} "
                f"(columns: {', '.join(header)}), or pass levels="
            )
        return found
    missing = [level for level in levels if level not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing label column(s) {', '.join(map(repr, missing))} (columns: {', '.join(header)})"
        )
    if required and not levels:
        raise DatasetError(f"{csv_path}: levels must name at least one label column")
    return list(levels)


def record_path(csv_path: Path, base: Path, line: int, record: dict[str, str]) -> Path:
    """The absolute image path of a CSV record, relative paths resolved against ``base``.

    Raises:
        DatasetError: an empty ``path`` cell (the message names the line).
    """
    value = (record.get("path") or "").strip()
    if not value:
        raise DatasetError(f"{csv_path}, line {line}: empty 'path'")
    return Path(os.path.abspath(base / value))


class CsvImageDataset(FileImageDataset):
    """Images listed in a CSV with a ``path`` column and one column per label level.

    Args:
        csv_path: the CSV file (UTF-8, header row).
        root: folder that relative paths are resolved against; defaults to the CSV's own folder.
        levels: label columns to use, finest first; defaults to the columns among ``fine, middle, coarse``
            present in the header, in that order.
        transform: see :class:`LabelledImageDataset`.
        split: keep only rows whose ``split`` column equals this value (for CSVs that hold several splits).

    Raises:
        DatasetError: missing file, no header, no rows, a missing column or an empty label cell.
    """

    def __init__(
        self,
        csv_path: str | Path,
        root: str | Path | None = None,
        levels: Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        split: str | None = None,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DatasetError(f"label file not found: {csv_path}")
        header, records = read_csv_records(csv_path)
        level_names = label_columns(csv_path, header, levels)
        if split is not None:
            records = self._filter_split(csv_path, header, records, split)
        base = Path(root) if root is not None else csv_path.parent
        paths, rows = [], []
        for line, rec in records:
            path = record_path(csv_path, base, line, rec)
            values = [(rec.get(level) or "").strip() for level in level_names]
            for level, value in zip(level_names, values, strict=True):
                if not value:
                    raise DatasetError(f"{csv_path}, line {line}: empty {level!r} label for {rec['path'].strip()}")
            paths.append(path)
            rows.append(values)
        schema = LabelSchema(tuple(level_names))
        vocab, labels = _encode_rows(schema, rows)
        super().__init__(schema, vocab, labels, paths, transform)
        self.csv_path = csv_path

    @staticmethod
    def _filter_split(
        csv_path: Path, header: list[str], records: list[tuple[int, dict[str, str]]], split: str
    ) -> list[tuple[int, dict[str, str]]]:
        if "split" not in header:
            raise DatasetError(f"{csv_path}: split={split!r} requested but there is no 'split' column")
        kept = [(line, rec) for line, rec in records if (rec.get("split") or "").strip() == split]
        if not kept:
            present = sorted({(rec.get("split") or "").strip() for _, rec in records})
            raise DatasetError(f"{csv_path}: no rows with split={split!r} (splits present: {', '.join(present)})")
        return kept


class ImageFolderDataset(FileImageDataset):
    """A folder of class folders (``root/<class>/**/<image>``): one label level, the sub-folder name.

    Images lying directly in ``root`` get the class ``"unlabelled"``, so a plain gallery folder without
    classes can still be indexed.

    Args:
        root: the folder.
        transform: see :class:`LabelledImageDataset`.
        level: name of the single label level.

    Raises:
        DatasetError: the folder is missing or holds no image files.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, level: str = "fine") -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder not found: {root}")
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        )
        if not files:
            raise DatasetError(
                f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in sub-folders)"
            )
        rows = [[p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else UNLABELLED] for p in files]
        schema = LabelSchema((level,))
        vocab, labels = _encode_rows(schema, rows)
        paths = [Path(os.path.abspath(p)) for p in files]
        super().__init__(schema, vocab, labels, paths, transform)
        self.root = root


class InMemoryImageDataset(LabelledImageDataset):
    """Images already in memory (PIL images or ``(H, W, 3)`` uint8 arrays), e.g. the synthetic dataset.

    Args:
        images: a sequence of PIL images or uint8 arrays, or one ``(N, H, W, 3)`` uint8 array.
        labels: int64 ``(N, L)`` label ids in ``vocab``.
        schema: the label levels.
        vocab: class names per level.
        names: a display name per item.
        transform: see :class:`LabelledImageDataset`.
    """

    def __init__(
        self,
        images: Sequence[Image.Image | np.ndarray] | np.ndarray,
        labels: np.ndarray,
        schema: LabelSchema,
        vocab: LabelVocabulary,
        names: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise DatasetError(f"got {len(images)} images for {len(labels)} label rows")
        super().__init__(schema, vocab, labels, names, transform)
        self.images = images

    def _load_row(self, row: int) -> Image.Image:
        image = self.images[row]
        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")


def open_dataset(
    spec: str | Path, levels: Sequence[str] | None = None, *, split: str | None = None
) -> LabelledImageDataset:
    """Open a dataset from a path given on the command line or in a config.

    A ``.csv`` file, or a folder holding ``labels.csv``, opens as :class:`CsvImageDataset`; any other folder
    as :class:`ImageFolderDataset` (class = sub-folder; ``levels`` may name its single level).

    Raises:
        DatasetError: the path does not exist, or the spec cannot be opened as a dataset.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: expected a .csv label file or an image folder")
        return CsvImageDataset(path, levels=levels, split=split)
    if path.is_dir():
        if (path / "labels.csv").is_file():
            return CsvImageDataset(path / "labels.csv", levels=levels, split=split)
        if split is not None:
            raise DatasetError(f"{path}: split={split!r} needs a labels.csv with a 'split' column")
        if levels is not None and len(levels) != 1:
            raise DatasetError(f"{path}: an image folder has a single label level, got levels={list(levels)}")
        return ImageFolderDataset(path, level=levels[0] if levels else "fine")
    raise DatasetError(f"dataset not found: {path}")
