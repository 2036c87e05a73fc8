"""Google-Landmarks-v2 style label files: one landmark id per image, a single ``fine`` label level.

Three CSV layouts are recognised from the header (UTF-8, header row, extra columns such as ``url`` ignored)::

    id,landmark_id              GLDv2 train.csv: images at <images_root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg
    landmark_id,images          GLDv2 train_clean.csv: space-separated image ids per landmark, same layout
    path,landmark_id            image paths, relative to the CSV's folder (or images_root) or absolute

The GLDv2 layout is the one of the official download (``train/0/0/0/000014b1f770f640.jpg``), so the
released CSVs are read as they are. The landmark id is kept as the class name in the dataset's
vocabulary; class ids are assigned in first-seen order.

Images are decoded lazily like every other dataset here; opening GLDv2-clean (1.6M images) touches
no image file, and a missing one fails when it is read, with an error naming it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from retrieval.data.datasets import DatasetError, FileImageDataset, Transform, _encode_rows
from retrieval.data.labels import LabelSchema

__all__ = ["LANDMARK_LEVEL", "LandmarksDataset", "gldv2_image_path", "open_landmarks_csv"]

LANDMARK_LEVEL = "fine"  # the single label level: class = landmark_id
_GLDV2_EXTENSION = ".jpg"


def gldv2_image_path(images_root: str | Path, image_id: str) -> Path:
    """Where GLDv2 stores image ``image_id``: ``<images_root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``.

    Raises:
        ValueError: an id too short for the three folder levels, or one holding a path separator.
    """
    if len(image_id) < 3 or any(sep in image_id for sep in ("/", "\\")) or image_id.startswith("."):
        raise ValueError(f"image id {image_id!r} does not fit the GLDv2 layout <a>/<b>/<c>/<id>.jpg")
    return Path(images_root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{_GLDV2_EXTENSION}"


class LandmarksDataset(FileImageDataset):
    """Images of landmarks with one label level (``fine`` = landmark id), read from a GLDv2-style CSV.

    Build it with :func:`open_landmarks_csv`. ``names`` are the images' absolute file paths, which is
    what the aspect-ratio sampler reads image sizes from.

    Attributes:
        csv_path: the label file.
        layout: ``"id"``, ``"clean"`` (``landmark_id,images``) or ``"path"``: the CSV layout found.
    """

    def __init__(
        self, csv_path: Path, layout: str, files: list[str], landmarks: list[str], transform: Transform | None = None
    ) -> None:
        schema = LabelSchema((LANDMARK_LEVEL,))
        vocab, labels = _encode_rows(schema, [[landmark] for landmark in landmarks])
        super().__init__(schema, vocab, labels, files, transform)
        self.csv_path = csv_path
        self.layout = layout


def open_landmarks_csv(
    csv_path: str | Path, images_root: str | Path | None = None, transform: Transform | None = None
) -> LandmarksDataset:
    """Open a landmarks label file in any of the three layouts (see the module docstring).

    Args:
        csv_path: the CSV file.
        images_root: the GLDv2 image folder (the one holding ``0/ 1/ ... f/``); required by the ``id`` and
            ``landmark_id,images`` layouts. For the ``path`` layout, relative paths are resolved against it
            when given, else against the CSV's folder.
        transform: see :class:`~retrieval.data.datasets.LabelledImageDataset`.

    Raises:
        DatasetError: a missing file, an unknown header, an empty cell or malformed id (with its line), no
            rows, or a missing ``images_root`` for a layout that needs it. Every message names the CSV.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"landmarks label file not found: {csv_path}")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            header = [cell.strip().lower() for cell in next(csv.reader([fh.readline()]), [])]
            layout = _layout(csv_path, header)
            root = _images_root(csv_path, layout, images_root)
            if layout == "clean":
                files, landmarks = _read_clean(csv_path, fh, header, root)
            else:
                files, landmarks = _read_rows(csv_path, fh, header, layout, root)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: not a readable UTF-8 CSV ({exc})") from None
    if not files:
        raise DatasetError(f"{csv_path}: no images listed after the header")
    return LandmarksDataset(csv_path, layout, files, landmarks, transform)


def _layout(csv_path: Path, header: list[str]) -> str:
    if not header or header == [""]:
        raise DatasetError(f"{csv_path}: empty file (expected a header such as 'id,landmark_id')")
    if "landmark_id" in header:
        for column, layout in (("images", "clean"), ("id", "id"), ("path", "path")):
            if column in header:
                return layout
    raise DatasetError(
        f"{csv_path}: unrecognised columns ({', '.join(header)}); expected 'id,landmark_id', "
        "'landmark_id,images' (GLDv2 train_clean.csv) or 'path,landmark_id'"
    )


def _images_root(csv_path: Path, layout: str, images_root: str | Path | None) -> Path:
    if images_root is None:
        if layout != "path":
            raise DatasetError(
                f"{csv_path}: image ids in the GLDv2 layout need the images folder "
                "(images_root; data.landmarks_images in a training config)"
            )
        return csv_path.parent
    root = Path(images_root)
    if not root.is_dir():
        raise DatasetError(f"{csv_path}: images folder not found: {root}")
    return root


def _read_rows(csv_path: Path, fh, header: list[str], layout: str, root: Path) -> tuple[list[str], list[str]]:
    key, files, landmarks = ("id" if layout == "id" else "path"), [], []
    column, label_column, width = header.index(key), header.index("landmark_id"), len(header)
    for line, cells in enumerate(csv.reader(fh), start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank line
        if len(cells) != width:
            raise DatasetError(f"{csv_path}, line {line}: {len(cells)} cells for {width} header columns")
        value, landmark = cells[column].strip(), cells[label_column].strip()
        if not value or not landmark:
            raise DatasetError(f"{csv_path}, line {line}: empty {key!r} or 'landmark_id'")
        if layout == "id":
            files.append(str(_gldv2_path(csv_path, line, root, value)))
        else:
            files.append(os.path.abspath(root / value))
        landmarks.append(landmark)
    return files, landmarks


def _read_clean(csv_path: Path, fh, header: list[str], root: Path) -> tuple[list[str], list[str]]:
    """``landmark_id,images`` rows, split by hand: a popular landmark's cell outgrows csv's field limit."""
    if header != ["landmark_id", "images"]:
        raise DatasetError(f"{csv_path}: the train_clean layout has exactly the columns 'landmark_id,images'")
    files, landmarks = [], []
    for line, text in enumerate(fh, start=2):
        if not text.strip():
            continue
        landmark, sep, images = text.partition(",")
        landmark, ids = landmark.strip(), images.split()
        if not sep or not landmark or not ids:
            raise DatasetError(f"{csv_path}, line {line}: expected 'landmark_id,<space-separated image ids>'")
        files.extend(str(_gldv2_path(csv_path, line, root, image_id)) for image_id in ids)
        landmarks.extend([landmark] * len(ids))
    return files, landmarks


def _gldv2_path(csv_path: Path, line: int, root: Path, image_id: str) -> Path:
    try:
        return Path(os.path.abspath(gldv2_image_path(root, image_id)))
    except ValueError as exc:
        raise DatasetError(f"{csv_path}, line {line}: {exc}") from None
