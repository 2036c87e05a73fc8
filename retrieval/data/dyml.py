"""Loaders for the official DyML-Vehicle, DyML-Animal and DyML-Product releases, as downloaded.

Layout of a dataset root (``ROOT``)::

    ROOT/train/label.csv                 fname, coarse_id, middle_id, fine_id
    ROOT/train/imgs/<fname>

    # DyML-Vehicle and DyML-Animal: one query/gallery pair per level L in fine, middle, coarse
    ROOT/bmk_L/query.csv                 fname, labels      (ids at level L only)
    ROOT/bmk_L/gallery.csv               fname, labels
    ROOT/bmk_L/query/<fname>
    ROOT/bmk_L/gallery/<fname>

    # DyML-Product: one set labelled at all three levels; per level, each image queries all the others
    ROOT/mini-bmk_all_in_one/label.csv   fname, coarse_id, middle_id, fine_id
    ROOT/mini-bmk_all_in_one/imgs/<fname>

The label files separate fields with ``", "`` (comma and space). In the released files the header line
has no line break after it, so the first row is glued onto the last column name: the first line reads
``fname, coarse_id, middle_id, fine_id0.jpg, 3, 12, 456``. Public loaders either split that line on the
last ``_id`` or read ``fine_id0.jpg`` as the label column's name and silently drop the first image.
:func:`read_dyml_csv` accepts both that line and a well-formed header (columns found by name, in any order,
with or without the ``_id`` suffix and the space after commas) and keeps the first row either way.

Labels are the dataset's own ids, kept as class names in each dataset's
:class:`~retrieval.data.labels.LabelVocabulary`. Images are decoded lazily, like every other dataset here,
so a missing image file only fails when it is read.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.data.datasets import DatasetError, FileImageDataset, LabelledImageDataset, Transform, _encode_rows
from retrieval.data.labels import LabelSchema

__all__ = [
    "DYML_LEVELS",
    "DymlImageDataset",
    "DymlLevelSplit",
    "open_dyml_test",
    "open_dyml_train",
    "read_dyml_csv",
]

DYML_LEVELS: tuple[str, ...] = ("fine", "middle", "coarse")
COLUMNS: tuple[str, ...] = ("fname", "coarse", "middle", "fine", "labels")  # canonical column names
PRODUCT_TEST = "mini-bmk_all_in_one"
EXPECTED_TEST_LAYOUT = (
    "expected bmk_fine/, bmk_middle/ and bmk_coarse/, each with query.csv, gallery.csv, query/ and gallery/ "
    f"(DyML-Vehicle, DyML-Animal), or {PRODUCT_TEST}/ with label.csv and imgs/ (DyML-Product)"
)


def _canonical(name: str) -> str | None:
    """The canonical column a header cell names (``fine_id`` -> ``fine``), or ``None`` for other columns."""
    name = name.strip().lower()
    name = name.removesuffix("_id")
    name = "labels" if name == "label" else name
    return name if name in COLUMNS else None


def _split_glued(cell: str) -> tuple[str, str] | None:
    """Split a header cell glued to the first value (``fine_id0.jpg`` -> ``fine_id``, ``0.jpg``)."""
    lowered = cell.lower()
    spellings = [s for c in COLUMNS for s in (c, c + "_id")] + ["label", "label_id"]
    for spelling in sorted(spellings, key=len, reverse=True):
        if lowered.startswith(spelling) and len(cell) > len(spelling):
            return cell[: len(spelling)], cell[len(spelling) :]
    return None


def _parse_header(path: Path, cells: list[str], next_width: int | None) -> tuple[list[str], list[str] | None]:
    """Header cells and, for the glued-header quirk, the first row's cells recovered from the same line.

    A cell that is no column name but starts with one (``fine_id0.jpg``) is the glued one when data cells
    follow it on the line, none of them a column name, and either they complete one row or the next line is
    as wide as the header would be; otherwise it is an extra column (``fine_grained``), which is ignored.
    """
    for i, cell in enumerate(cells):
        if _canonical(cell) is not None:
            continue
        glued = _split_glued(cell)
        if (
            glued is None
            or _canonical(glued[0]) in {_canonical(c) for c in cells[:i]}
            or len(cells) == i + 1
            or any(_canonical(c) is not None for c in cells[i + 1 :])
        ):
            continue  # an extra column we do not use
        header, first = [*cells[:i], glued[0]], [glued[1], *cells[i + 1 :]]
        if len(first) == len(header):
            return header, first
        if next_width not in (None, len(header)):
            continue
        raise DatasetError(
            f"{path}, line 1: the first row is glued onto the header (no line break after {glued[0]!r}) "
            f"but has {len(first)} fields instead of {len(header)}"
        )
    return cells, None


def read_dyml_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Read a DyML label file, tolerating the released files' glued header (see the module docstring).

    Args:
        path: a ``label.csv``, ``query.csv`` or ``gallery.csv``.
        columns: the canonical columns needed, among ``fname, coarse, middle, fine, labels``.

    Returns:
        One dict per data row, in file order, keyed by the canonical names in ``columns``.

    Raises:
        DatasetError: a missing or unreadable file, no header or no rows, a missing column, or a row with
            the wrong number of fields or an empty needed cell (the message names the file and line).
    """
    path = Path(path)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown DyML column(s) {unknown}; columns are {', '.join(COLUMNS)}")
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DatasetError(f"{path}: empty file (expected a header row: {', '.join(columns)})")
    try:
        reader = csv.reader((line for _, line in lines), skipinitialspace=True)
        parsed = [(n, [c.strip() for c in row]) for (n, _), row in zip(lines, reader, strict=True)]
    except (csv.Error, ValueError) as exc:  # ValueError: a quoted cell spanning lines
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from None
    header, first = _parse_header(path, parsed[0][1], len(parsed[1][1]) if len(parsed) > 1 else None)
    records = ([(parsed[0][0], first)] if first is not None else []) + parsed[1:]
    position: dict[str, int] = {}
    for k, cell in enumerate(header):
        name = _canonical(cell)
        if name is not None:
            position.setdefault(name, k)
    missing = [c for c in columns if c not in position]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(header)}; "
            f"a DyML label file has {', '.join(columns)}, ', '-separated)"
        )
    if not records:
        raise DatasetError(f"{path}: no rows after the header")
    rows = []
    for line, cells in records:
        if len(cells) != len(header):
            raise DatasetError(
                f"{path}, line {line}: {len(cells)} fields, expected {len(header)} ({', '.join(header)})"
            )
        row = {c: cells[position[c]] for c in columns}
        empty = [c for c, value in row.items() if not value]
        if empty:
            raise DatasetError(f"{path}, line {line}: empty {empty[0]!r}")
        rows.append(row)
    return rows


class DymlImageDataset(FileImageDataset):
    """Images listed in one DyML label file, at ``image_dir/<fname>``, labelled with the file's own ids.

    Args:
        csv_path: the label file (see :func:`read_dyml_csv`).
        image_dir: folder the ``fname`` column is relative to.
        levels: label levels of the dataset, finest first.
        columns: the CSV column holding each level (default: the level names; ``labels`` in the bmk files).
        transform: see :class:`~retrieval.data.datasets.LabelledImageDataset`.
        rows: rows already read from ``csv_path`` (to build several per-level datasets from one read).

    Raises:
        DatasetError: see :func:`read_dyml_csv`.
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path,
        levels: Sequence[str],
        columns: Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        rows: Sequence[dict[str, str]] | None = None,
    ) -> None:
        csv_path, image_dir = Path(csv_path), Path(image_dir)
        columns = list(levels) if columns is None else list(columns)
        if rows is None:
            rows = read_dyml_csv(csv_path, ["fname", *columns])
        schema = LabelSchema(tuple(levels))
        vocab, labels = _encode_rows(schema, [[row[c] for c in columns] for row in rows])
        paths = [Path(os.path.abspath(image_dir / row["fname"])) for row in rows]
        super().__init__(schema, vocab, labels, paths, transform)
        self.csv_path = csv_path
        self.image_dir = image_dir


@dataclass(frozen=True)
class DymlLevelSplit:
    """The query/gallery sets of one DyML test level.

    Attributes:
        level: ``"fine"``, ``"middle"`` or ``"coarse"``.
        query: the queries, with the single-level schema ``LabelSchema((level,))``.
        gallery: the gallery, or ``None`` for leave-one-out over ``query`` (each query searches all the
            other queries; the DyML-Product layout).

    Query and gallery each number their classes in their own vocabulary: match them by class name
    (``vocab.names[0]``, the dataset's ids), not by the integer labels.
    """

    level: str
    query: LabelledImageDataset
    gallery: LabelledImageDataset | None

    def __post_init__(self) -> None:
        if self.level not in DYML_LEVELS:
            raise ValueError(f"unknown DyML level {self.level!r}; levels are {', '.join(DYML_LEVELS)}")
        for part in (self.query, self.gallery):
            if part is not None and part.schema != LabelSchema((self.level,)):
                raise ValueError(f"{self.level} split needs single-level datasets, got levels {part.schema.levels}")


def _require_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"DyML dataset root not found: {root}")
    return root


def _check_nesting(dataset: DymlImageDataset) -> None:
    try:
        dataset.schema.check_hierarchy(dataset.labels)
    except ValueError:
        pass
    else:
        return
    levels = dataset.schema.levels
    for k in range(len(levels) - 1):
        parents: dict[str, str] = {}
        for name, row in zip(dataset.names, dataset.labels, strict=True):
            child, parent = dataset.vocab.names[k][row[k]], dataset.vocab.names[k + 1][row[k + 1]]
            if parents.setdefault(child, parent) != parent:
                raise DatasetError(
                    f"{dataset.csv_path}: labels do not nest: {levels[k]} id {child} has {levels[k + 1]} ids "
                    f"{parents[child]} and {parent} (e.g. at {os.path.basename(name)})"
                )


def open_dyml_train(root: str | Path) -> LabelledImageDataset:
    """The training set of a DyML root: ``train/label.csv`` with images in ``train/imgs/``.

    Returns:
        A lazily loaded dataset with levels ``("fine", "middle", "coarse")``; names are the image paths and
        class names the dataset's own ids.

    Raises:
        DatasetError: a missing root or label file, a malformed label file, or labels that do not nest.
    """
    root = _require_root(root)
    csv_path = root / "train" / "label.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"label file not found: {csv_path} (a DyML root holds train/label.csv with fname, coarse_id, middle_id, "
            "fine_id and the images in train/imgs/)"
        )
    dataset = DymlImageDataset(csv_path, root / "train" / "imgs", DYML_LEVELS)
    _check_nesting(dataset)
    return dataset


def _bmk_split(root: Path, level: str) -> DymlLevelSplit:
    folder = root / f"bmk_{level}"
    if not folder.is_dir():
        raise DatasetError(f"{root}: missing bmk_{level}/ ({EXPECTED_TEST_LAYOUT})")
    query, gallery = (
        DymlImageDataset(folder / f"{part}.csv", folder / part, (level,), ("labels",)) for part in ("query", "gallery")
    )
    return DymlLevelSplit(level, query, gallery)


def _product_splits(root: Path) -> list[DymlLevelSplit]:
    folder = root / PRODUCT_TEST
    csv_path = folder / "label.csv"
    rows = read_dyml_csv(csv_path, ["fname", *DYML_LEVELS])
    return [
        DymlLevelSplit(level, DymlImageDataset(csv_path, folder / "imgs", (level,), rows=rows), None)
        for level in DYML_LEVELS
    ]


def open_dyml_test(root: str | Path) -> list[DymlLevelSplit]:
    """The test sets of a DyML root, one split per level in the order fine, middle, coarse.

    DyML-Vehicle and DyML-Animal (``bmk_<level>/`` folders) give each level its own query and gallery
    images; DyML-Product (``mini-bmk_all_in_one/``) gives one set labelled at every level, searched
    leave-one-out (``gallery`` is ``None``).

    Raises:
        DatasetError: a missing root, neither layout present (the message says what is expected), a missing
            level folder or label file, or a malformed label file.
    """
    root = _require_root(root)
    if any((root / f"bmk_{level}").is_dir() for level in DYML_LEVELS):
        return [_bmk_split(root, level) for level in DYML_LEVELS]
    if (root / PRODUCT_TEST).is_dir():
        return _product_splits(root)
    raise DatasetError(f"{root}: no DyML test set found; {EXPECTED_TEST_LAYOUT}")
