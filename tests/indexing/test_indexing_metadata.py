"""MetadataStore: a real SQLite file, rows round-trip, lookups are chunked, ids are unique."""

from __future__ import annotations

import sqlite3

import pytest

from indexing.metadata import MetadataRow, MetadataStore


def test_round_trip_through_a_real_sqlite_file(tmp_path):
    path = tmp_path / "meta.sqlite"
    rows = [
        MetadataRow(id=i * 3 - 5, path=f"img/{i}.png", labels={"fine": f"f{i}", "coarse": "c"}, extra={"n": i})
        for i in range(1200)  # more than one IN (...) chunk
    ]
    with MetadataStore(path) as store:
        assert store.add_many(rows) == 1200
        store.add_many([{"id": 10**15, "path": None, "labels": {"fine": "ünïcode"}}])  # dicts are accepted
    with sqlite3.connect(path) as conn:  # it is an ordinary table others can read
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1201
    with MetadataStore(path, readonly=True) as store:
        assert store.count() == 1201
        wanted = [r.id for r in rows[::-1]] + [10**15, 123456789]  # last id is absent
        got = store.get_many(wanted)
        assert set(got) == {r.id for r in rows} | {10**15}
        assert all(got[r.id] == r for r in rows)
        assert got[10**15] == MetadataRow(id=10**15, path=None, labels={"fine": "ünïcode"}, extra={})
        assert store.get(123456789) is None
        assert [r.id for r in store.iter_rows(batch_size=100)] == sorted(got)
        with pytest.raises(PermissionError, match="read-only"):
            store.add_many([MetadataRow(id=1)])


def test_duplicate_ids_are_rejected_atomically(tmp_path):
    with MetadataStore(tmp_path / "m.sqlite") as store:
        store.add_many([MetadataRow(id=1, path="a")])
        with pytest.raises(ValueError, match="duplicate item id"):
            store.add_many([MetadataRow(id=2, path="b"), MetadataRow(id=1, path="c")])
        assert store.count() == 1  # the failed batch added nothing
        assert store.get(1).path == "a"


def test_readonly_open_of_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.sqlite"):
        MetadataStore(tmp_path / "nope.sqlite", readonly=True)
