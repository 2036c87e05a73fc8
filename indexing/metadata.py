"""Per-item metadata (path, labels, free-form extras) in a SQLite file beside the FAISS index.

FAISS stores vectors and integer ids only; what a hit *is* (its file, its classes) lives
here, keyed by the same id. SQLite keeps the lookup of a page of hits to one indexed
query without loading the whole gallery's metadata into memory.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.resources import Closeable

__all__ = ["MetadataRow", "MetadataStore"]

#: Ids per ``IN (...)`` query; well under SQLite's bound-parameter limit on every version.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}'
)
"""


@dataclass(frozen=True)
class MetadataRow:
    """Metadata of one indexed item.

    Attributes:
        id: the item's id, the same int64 the FAISS index returns.
        path: image path or display name.
        labels: class name per label level.
        extra: any other JSON-serialisable attributes (source, URL, ...).
    """

    id: int
    path: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class MetadataStore(Closeable):
    """A SQLite table ``items(id INTEGER PRIMARY KEY, path TEXT, labels TEXT JSON, extra TEXT JSON)``.

    The connection may be shared between threads (the HTTP server answers requests from a
    thread pool); a lock serialises access to it.

    Args:
        path: the SQLite file; created (with its table) unless ``readonly``.
        readonly: open an existing file without the right to change it, as a server does.

    Raises:
        FileNotFoundError: ``readonly`` and the file does not exist.
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"metadata database not found: {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
            with self._conn:
                self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()

    def add_many(self, rows: Iterable[MetadataRow | Mapping[str, Any]]) -> int:
        """Insert rows (``MetadataRow`` or dicts with its fields) in one transaction; return how many.

        Raises:
            ValueError: an id that is already stored (or repeated in ``rows``); nothing is added then.
        """
        if self.readonly:
            raise PermissionError(f"metadata database {self.path} was opened read-only")
        with self._lock:
            try:
                with self._conn:  # one transaction: all rows or none
                    cursor = self._conn.executemany(
                        "INSERT INTO items (id, path, labels, extra) VALUES (?, ?, ?, ?)",
                        (_encode(row) for row in rows),
                    )
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"{self.path}: duplicate item id ({exc})") from exc
            return cursor.rowcount

    def get_many(self, ids: Iterable[int]) -> dict[int, MetadataRow]:
        """Rows for the given ids; ids that are not stored are absent from the result."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, MetadataRow] = {}
        with self._lock:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id, path, labels, extra FROM items WHERE id IN ({marks})"
                for row in self._conn.execute(query, chunk):
                    found[row[0]] = _decode(row)
        return found

    def get(self, item_id: int) -> MetadataRow | None:
        """One row, or ``None`` if the id is not stored."""
        return self.get_many([item_id]).get(int(item_id))

    def integrity_problem(self) -> str | None:
        """SQLite's ``PRAGMA quick_check`` verdict: ``None`` when the file is sound, else its first complaint.

        Used on files no checksum vouches for (manifests older than ``metadata_sha256``); it reads the whole
        file once, so it is not run on every open of a checksummed index.
        """
        with self._lock:
            try:
                verdict = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                return str(exc)
        return None if verdict == "ok" else str(verdict).splitlines()[0]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def max_id(self) -> int | None:
        """The largest stored id (where ``index add`` continues), or ``None`` for an empty store."""
        return self.id_range()[1]

    def id_range(self) -> tuple[int | None, int | None]:
        """Smallest and largest stored id, ``(None, None)`` for an empty store."""
        with self._lock:
            low, high = self._conn.execute("SELECT MIN(id), MAX(id) FROM items").fetchone()
        return (None if low is None else int(low)), (None if high is None else int(high))

    def ids(self) -> np.ndarray:
        """All stored ids, sorted, as int64 (for checking the store against the FAISS index)."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM items ORDER BY id").fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def ids_with_label(self, level: str, values: Iterable[str]) -> np.ndarray:
        """Sorted int64 ids of the items whose label at ``level`` is one of ``values``.

        This is how a label filter reaches a backend that stores no labels (FAISS): the filter becomes the
        set of ids a search may return. One scan of the table (no index on labels).
        """
        wanted = list(dict.fromkeys(str(value) for value in values))
        if not wanted:
            return np.zeros(0, np.int64)
        marks = ",".join("?" * len(wanted))
        query = (  # json_each matches the level as a key, whatever characters its name holds
            "SELECT items.id FROM items, json_each(items.labels) AS label "
            f"WHERE label.key = ? AND label.value IN ({marks}) ORDER BY items.id"
        )
        with self._lock:
            rows = self._conn.execute(query, [str(level), *wanted]).fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def iter_rows(self, batch_size: int = 1000) -> Iterator[MetadataRow]:
        """All rows in id order, fetched in batches (for export and consistency checks)."""
        last: int | None = None
        while True:
            with self._lock:
                if last is None:
                    cursor = self._conn.execute(
                        "SELECT id, path, labels, extra FROM items ORDER BY id LIMIT ?", (batch_size,)
                    )
                else:
                    cursor = self._conn.execute(
                        "SELECT id, path, labels, extra FROM items WHERE id > ? ORDER BY id LIMIT ?",
                        (last, batch_size),
                    )
                batch = cursor.fetchall()
            if not batch:
                return
            yield from (_decode(row) for row in batch)
            last = batch[-1][0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _encode(row: MetadataRow | Mapping[str, Any]) -> tuple[int, str | None, str, str]:
    if isinstance(row, Mapping):
        row = MetadataRow(**row)
    return int(row.id), row.path, json.dumps(dict(row.labels)), json.dumps(dict(row.extra))


def _decode(row: tuple[int, str | None, str, str]) -> MetadataRow:
    item_id, path, labels, extra = row
    return MetadataRow(id=int(item_id), path=path, labels=json.loads(labels), extra=json.loads(extra))
