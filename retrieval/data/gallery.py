"""The images to index: a folder tree, a CSV of paths with optional label and metadata columns, or a path list.

Training needs every image labelled; a gallery does not. A product catalogue arrives as a CSV with a
SKU and a URL beside each path, a crawl as a plain list of files, a photo archive as a folder tree.
:class:`Gallery` holds what indexing needs from any of them, in a fixed order: a name (path) per item,
the labels it has (possibly none), free-form metadata columns, and a way to read its image. The order is
what makes extraction resumable and shardable: chunk ``c`` is always the same items.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from retrieval.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageFolderDataset,
    LabelledImageDataset,
    label_columns,
    read_csv_records,
    record_path,
)
from retrieval.data.images import load_image

__all__ = ["Gallery", "as_gallery", "open_gallery"]


class Gallery:
    """Items to embed and index, in a fixed order.

    Either wraps a labelled dataset (every item labelled at every level) or holds file paths with
    per-item labels and metadata read from a CSV or a path list.

    Attributes:
        source: where the gallery came from (shown in summaries, recorded in extraction files).
        names: one path (or display name) per item.
        levels: the label levels the gallery carries, finest first; empty for an unlabelled gallery.
        transform: always ``None``; extraction applies the encoder's own preprocessing.
    """

    transform = None

    def __init__(
        self,
        source: str,
        names: Sequence[str],
        levels: Sequence[str] = (),
        labels: Sequence[dict[str, str]] | None = None,
        extras: Sequence[dict[str, str]] | None = None,
        dataset: LabelledImageDataset | None = None,
    ) -> None:
        self.source = source
        self.names = list(names)
        self.levels = tuple(levels)
        self._labels = list(labels) if labels is not None else None
        self._extras = list(extras) if extras is not None else None
        self._dataset = dataset
        for what, values in (("labels", self._labels), ("metadata", self._extras)):
            if values is not None and len(values) != len(self.names):
                raise DatasetError(f"gallery {source}: {len(values)} {what} rows for {len(self.names)} items")

    @classmethod
    def from_dataset(cls, dataset: LabelledImageDataset, source: str | None = None) -> Gallery:
        """A gallery over a labelled dataset (its images, names and labels at every level)."""
        return cls(source or repr(dataset), dataset.names, dataset.schema.levels, dataset=dataset)

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of item ``i``; ``CorruptImageError`` names the file when it cannot be read."""
        if self._dataset is not None:
            return self._dataset.load_image(i)
        return load_image(self.names[i])

    def labels_of(self, i: int) -> dict[str, str]:
        """Class name per level for item ``i`` (levels with an empty cell are absent)."""
        if self._dataset is not None:
            return self._dataset.label_names(i)
        return dict(self._labels[i]) if self._labels is not None else {}

    def extra_of(self, i: int) -> dict[str, str]:
        """Free-form metadata of item ``i`` (the CSV's other columns), stored beside its labels."""
        return dict(self._extras[i]) if self._extras is not None else {}

    def fingerprint(self) -> str:
        """SHA-256 over every item's name, labels and metadata, in order.

        Two extraction runs (a resumed one, or the shards of a job array) may only be combined when they
        describe the same gallery in the same order; comparing fingerprints checks that cheaply.
        """
        digest = hashlib.sha256()
        for i, name in enumerate(self.names):
            record = [name, self.labels_of(i), self.extra_of(i)]
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def __repr__(self) -> str:
        levels = ", ".join(self.levels) or "unlabelled"
        return f"Gallery({self.source!r}, items={len(self)}, levels: {levels})"


def as_gallery(items: LabelledImageDataset | Gallery) -> Gallery:
    """A gallery as it is, or a labelled dataset as a gallery named after its CSV or folder."""
    if isinstance(items, Gallery):
        return items
    source = getattr(items, "csv_path", None) or getattr(items, "root", None) or repr(items)
    return Gallery.from_dataset(items, source=str(source))


def open_gallery(spec: str | Path, levels: Sequence[str] | None = None) -> Gallery:
    """Open the gallery given on the command line.

    - a ``.csv`` file (or a folder holding ``labels.csv``): a ``path`` column, optional label columns
      (``levels``, default: those of fine/middle/coarse present) and any other columns as metadata;
    - any other file: a text file of paths, one per line (blank lines and ``#`` comments ignored);
    - any other folder: every image below it, labelled by its first sub-folder (``unlabelled`` in the root).

    Relative paths in a CSV or path list are resolved against the file's own folder.

    Raises:
        DatasetError: a missing path, an image given instead of a list, an empty list, or a bad CSV.
    """
    path = Path(os.path.abspath(spec))  # recorded in manifests: absolute, so it means the same from anywhere
    if path.is_dir():
        if (path / "labels.csv").is_file():
            return _csv_gallery(path / "labels.csv", levels)
        if levels is not None and len(levels) != 1:
            raise DatasetError(f"{path}: an image folder has a single label level, got levels={list(levels)}")
        dataset = ImageFolderDataset(path, level=levels[0] if levels else "fine")
        return Gallery.from_dataset(dataset, source=str(path))
    if not path.is_file():
        raise DatasetError(f"gallery not found: {path} (expected an image folder, a CSV or a text file of paths)")
    if path.suffix.lower() == ".csv":
        return _csv_gallery(path, levels)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise DatasetError(f"{path} is an image; give the folder that holds it, a CSV or a text file of paths")
    if levels:
        raise DatasetError(f"{path}: a text file of paths carries no labels, so levels={list(levels)} cannot apply")
    return _path_list_gallery(path)


def _csv_gallery(csv_path: Path, levels: Sequence[str] | None) -> Gallery:
    header, records = read_csv_records(csv_path)
    level_names = label_columns(csv_path, header, levels, required=False)
    extra_columns = [column for column in header if column != "path" and column not in level_names]
    names, labels, extras = [], [], []
    for line, record in records:
        names.append(str(record_path(csv_path, csv_path.parent, line, record)))
        labels.append({level: cell for level in level_names if (cell := (record.get(level) or "").strip())})
        extras.append({column: (record.get(column) or "").strip() for column in extra_columns})
    return Gallery(str(csv_path), names, level_names, labels, extras if extra_columns else None)


def _path_list_gallery(list_path: Path) -> Gallery:
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(
            f"{list_path}: not a UTF-8 text file of paths (expected an image folder, a CSV or a text file of paths)"
        ) from None
    names = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names.append(os.path.abspath(list_path.parent / entry))
    if not names:
        raise DatasetError(f"{list_path}: no paths listed (one image path per line)")
    return Gallery(str(list_path), names)
