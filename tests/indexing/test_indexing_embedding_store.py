"""Chunked extraction store (indexing.embedding_store): shard parsing, chunk partitioning, open/resume/restart,
chunk round trips, torn-file recovery, and combining shard stores into gallery order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexing.embedding_store import (
    CHUNKS_DIR,
    SPEC_FILE,
    EmbeddingStore,
    ExtractionMismatchError,
    ExtractionSpec,
    combine_stores,
    parse_shard,
)
from indexing.errors import IndexFormatError

DIM = 4


def _spec(
    gallery_count: int = 10,
    chunk_size: int = 3,
    shard_index: int = 0,
    num_shards: int = 1,
    encoder_id: str = "enc-a",
    batch_size: int = 2,
) -> ExtractionSpec:
    return ExtractionSpec(
        encoder_id=encoder_id,
        dim=DIM,
        gallery_source="g",
        gallery_count=gallery_count,
        gallery_fingerprint="f",
        levels=["fine"],
        chunk_size=chunk_size,
        batch_size=batch_size,
        shard_index=shard_index,
        num_shards=num_shards,
    )


def _vector(position: int) -> np.ndarray:
    return np.arange(DIM, dtype=np.float32) + np.float32(position) * 10 + np.float32(0.25)


def _row(position: int) -> dict:
    return {"path": f"/gallery/{position}.png", "labels": {"fine": f"class-{position % 3}"}, "extra": {"n": position}}


def _fill(store: EmbeddingStore, skip: frozenset[int] = frozenset(), chunks=None) -> None:
    """Write every chunk of ``store`` (or only ``chunks``), skipping the gallery positions in ``skip``."""
    for chunk in store.spec.chunk_numbers() if chunks is None else chunks:
        kept = [p for p in store.spec.chunk_positions(chunk) if p not in skip]
        skipped = [(f"/gallery/{p}.png", "not a recognised image format") for p in store.spec.chunk_positions(chunk)]
        skipped = [s for s, p in zip(skipped, store.spec.chunk_positions(chunk), strict=True) if p in skip]
        embeddings = np.stack([_vector(p) for p in kept]) if kept else np.zeros((0, DIM), dtype=np.float32)
        store.write_chunk(chunk, np.array(kept, dtype=np.int64), embeddings, [_row(p) for p in kept], skipped)


# --- parse_shard -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("0/4", (0, 4)), (" 3 / 4 ", (3, 4)), ("0/1", (0, 1)), ("11/12", (11, 12))]
)
def test_parse_shard_accepts(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4/4", "must be below N"),
        ("5/4", "must be below N"),
        ("1/0", "must be below N"),
        ("0/0", "must be below N"),
        ("a/b", "must look like I/N"),
        ("1", "must look like I/N"),
        ("-1/4", "must look like I/N"),
        ("1/4/2", "must look like I/N"),
        ("", "must look like I/N"),
    ],
)
def test_parse_shard_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shard(text)


# --- chunk arithmetic --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gallery_count", "chunk_size", "num_shards"),
    [(10, 3, 1), (10, 3, 2), (10, 3, 4), (100, 7, 3), (2048, 256, 5), (5, 2, 5), (1, 10, 3), (9, 3, 3), (7, 1, 7)],
)
def test_chunk_numbers_partition_all_chunks(gallery_count, chunk_size, num_shards):
    specs = [_spec(gallery_count, chunk_size, i, num_shards) for i in range(num_shards)]
    total = -(-gallery_count // chunk_size)
    assert specs[0].total_chunks == total
    slices = [spec.chunk_numbers() for spec in specs]
    # Exactly every chunk once, in order, each shard a contiguous run.
    assert [c for s in slices for c in s] == list(range(total))
    for s in slices:
        assert s.step == 1
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    assert sizes.count(0) == max(0, num_shards - total)
    # Positions covered by the shards add up to the whole gallery, without gaps.
    assert sum(spec.positions() for spec in specs) == gallery_count
    covered = [p for s in slices for c in s for p in specs[0].chunk_positions(c)]
    assert covered == list(range(gallery_count))


def test_more_shards_than_chunks_leaves_some_empty():
    specs = [_spec(gallery_count=5, chunk_size=2, shard_index=i, num_shards=5) for i in range(5)]
    assert specs[0].total_chunks == 3
    assert [list(s.chunk_numbers()) for s in specs] == [[], [0], [], [1], [2]]
    assert [s.positions() for s in specs] == [0, 2, 0, 2, 1]


def test_last_chunk_is_short():
    spec = _spec(gallery_count=10, chunk_size=4)
    assert spec.total_chunks == 3
    assert spec.chunk_positions(0) == range(0, 4)
    assert spec.chunk_positions(1) == range(4, 8)
    assert spec.chunk_positions(2) == range(8, 10)
    exact = _spec(gallery_count=8, chunk_size=4)
    assert exact.total_chunks == 2
    assert len(exact.chunk_positions(1)) == 4


def test_spec_validates_its_fields():
    with pytest.raises(ValueError):
        _spec(gallery_count=0)
    with pytest.raises(ValueError):
        _spec(chunk_size=0)
    with pytest.raises(ValueError):
        _spec(num_shards=0)


# --- open_for ----------------------------------------------------------------------------------------------


def test_open_for_creates_the_directory(tmp_path):
    path = tmp_path / "deep" / "extraction"
    store = EmbeddingStore.open_for(path, _spec())
    assert (path / SPEC_FILE).is_file()
    assert (path / CHUNKS_DIR).is_dir()
    on_disk = json.loads((path / SPEC_FILE).read_text())
    assert on_disk["encoder_id"] == "enc-a"
    assert on_disk["chunk_size"] == 3
    assert EmbeddingStore.open(path).spec.gallery_count == 10
    assert store.missing_chunks() == [0, 1, 2, 3]
    assert not store.is_complete()


def test_open_for_accepts_an_empty_existing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    store = EmbeddingStore.open_for(tmp_path / "empty", _spec())
    assert (tmp_path / "empty" / SPEC_FILE).is_file()
    assert store.finished_chunks() == []


def test_open_for_same_job_keeps_finished_chunks(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store, chunks=[0, 2])
    again = EmbeddingStore.open_for(tmp_path / "x", _spec())
    assert again.finished_chunks() == [0, 2]
    assert again.missing_chunks() == [1, 3]
    assert again.spec.created_at == store.spec.created_at  # the original job, not a new one
    assert again.read_chunk(2).positions.tolist() == [6, 7, 8]


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"encoder_id": "enc-b"}, "encoder_id"),
        ({"batch_size": 8}, "batch_size"),
        ({"chunk_size": 5}, "chunk_size"),
        ({"gallery_count": 11}, "gallery_count"),
        ({"shard_index": 1, "num_shards": 2}, "shard"),
    ],
)
def test_open_for_refuses_another_job(tmp_path, changed, field):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store, chunks=[0])
    spec_before = (tmp_path / "x" / SPEC_FILE).read_text()
    with pytest.raises(ExtractionMismatchError, match=field) as info:
        EmbeddingStore.open_for(tmp_path / "x", _spec(**changed))
    assert "--restart" in str(info.value)
    # Nothing was touched.
    assert (tmp_path / "x" / SPEC_FILE).read_text() == spec_before
    assert EmbeddingStore.open(tmp_path / "x").finished_chunks() == [0]


def test_open_for_restart_discards_the_old_job(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store)
    assert store.is_complete()
    fresh = EmbeddingStore.open_for(tmp_path / "x", _spec(encoder_id="enc-b"), restart=True)
    assert fresh.spec.encoder_id == "enc-b"
    assert EmbeddingStore.open(tmp_path / "x").spec.encoder_id == "enc-b"
    assert list((tmp_path / "x" / CHUNKS_DIR).glob("chunk-*.npz")) == []
    assert fresh.missing_chunks() == [0, 1, 2, 3]


def test_open_for_restart_of_the_same_job_keeps_its_chunks(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store, chunks=[1])
    again = EmbeddingStore.open_for(tmp_path / "x", _spec(), restart=True)
    assert again.finished_chunks() == [1]


def test_reopening_removes_a_chunk_left_half_written_by_a_killed_run(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store, chunks=[0])
    torn = tmp_path / "x" / CHUNKS_DIR / ".chunk-000001.npz.tmp-abc123"
    torn.write_bytes(b"PK\x03\x04 half a zip")
    again = EmbeddingStore.open_for(tmp_path / "x", _spec())
    assert not torn.exists() and again.finished_chunks() == [0]


def test_an_unreadable_spec_is_refused_unless_restarted(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store, chunks=[0])
    (tmp_path / "x" / "extraction.json").write_text("{ torn")
    with pytest.raises(IndexFormatError, match="--restart"):
        EmbeddingStore.open_for(tmp_path / "x", _spec())
    fresh = EmbeddingStore.open_for(tmp_path / "x", _spec(), restart=True)
    assert fresh.missing_chunks() == [0, 1, 2, 3]


def test_open_for_refuses_a_foreign_directory_and_leaves_it_alone(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.txt").write_text("precious")
    with pytest.raises(IndexFormatError, match="not an extraction directory") as info:
        EmbeddingStore.open_for(foreign, _spec())
    assert not isinstance(info.value, ExtractionMismatchError)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.txt"]
    assert (foreign / "holiday.txt").read_text() == "precious"
    # restart does not make a foreign directory fair game either
    with pytest.raises(IndexFormatError, match="not an extraction directory"):
        EmbeddingStore.open_for(foreign, _spec(), restart=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.txt"]


def test_open_for_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexFormatError, match="not an extraction directory"):
        EmbeddingStore.open_for(tmp_path / "file", _spec())
    assert (tmp_path / "file").read_text() == "x"


def test_open_refuses_a_directory_without_spec_and_a_bad_spec(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(IndexFormatError, match="is missing"):
        EmbeddingStore.open(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SPEC_FILE).write_text("{not json")
    with pytest.raises(IndexFormatError, match="not a valid extraction spec"):
        EmbeddingStore.open(tmp_path / "bad")


# --- chunk files -------------------------------------------------------------------------------------------


def test_write_and_read_chunk_round_trip(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=5, chunk_size=3))
    rows = [
        {"path": "/g/ünïcødé.png", "labels": {"fine": "帽子"}, "extra": {"sku": "Ω-1", "url": "https://x/é"}},
        {"path": "/g/plain.png", "labels": {}, "extra": {}},
    ]
    embeddings = np.array([[0.1, 0.2, 0.3, 0.4], [-1.5, 2.5, 1e-8, 3e7]], dtype=np.float64)
    path = store.write_chunk(0, np.array([0, 2]), embeddings, rows, [("/g/ß broken.png", "truncated file: 12 bytes")])
    assert path == store.chunk_file(0)
    assert path.name == "chunk-000000.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["chunk-000000.npz"]  # no temporary file left behind

    chunk = store.read_chunk(0)
    assert chunk.positions.dtype == np.int64
    assert chunk.positions.tolist() == [0, 2]
    assert chunk.embeddings.dtype == np.float32
    assert chunk.embeddings.shape == (2, DIM)
    np.testing.assert_array_equal(chunk.embeddings, embeddings.astype(np.float32))
    assert chunk.rows == rows
    assert chunk.skipped == [("/g/ß broken.png", "truncated file: 12 bytes")]
    assert store.finished_chunks() == [0]
    assert store.missing_chunks() == [1]
    assert not store.is_complete()

    store.write_chunk(1, np.array([3, 4]), np.ones((2, DIM)), [rows[1], rows[1]], [])
    assert store.finished_chunks() == [0, 1]
    assert store.missing_chunks() == []
    assert store.is_complete()
    assert store.read_chunk(1).skipped == []


def test_chunk_with_every_item_skipped(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=2, chunk_size=2))
    store.write_chunk(0, np.array([], dtype=np.int64), np.zeros((0, DIM)), [], [("/a", "bad"), ("/b", "worse")])
    chunk = store.read_chunk(0)
    assert chunk.positions.shape == (0,)
    assert chunk.embeddings.shape == (0, DIM)
    assert chunk.rows == []
    assert chunk.skipped == [("/a", "bad"), ("/b", "worse")]
    assert store.is_complete()


def test_rewriting_a_chunk_replaces_it(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=2, chunk_size=2))
    store.write_chunk(0, np.array([0, 1]), np.zeros((2, DIM)), [{}, {}], [])
    store.write_chunk(0, np.array([0, 1]), np.full((2, DIM), 7.0), [{"v": 2}, {"v": 2}], [])
    chunk = store.read_chunk(0)
    assert chunk.embeddings[0, 0] == 7.0
    assert chunk.rows == [{"v": 2}, {"v": 2}]


def test_read_chunk_rejects_a_chunk_that_does_not_fit(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=6, chunk_size=3))
    # positions of chunk 0 written as chunk 1
    store.write_chunk(1, np.array([0, 1, 2]), np.zeros((3, DIM)), [{}, {}, {}], [])
    with pytest.raises(IndexFormatError, match="does not hold chunk 1"):
        store.read_chunk(1)
    # too few items (neither kept nor skipped)
    store.write_chunk(0, np.array([0]), np.zeros((1, DIM)), [{}], [])
    with pytest.raises(IndexFormatError, match="does not hold chunk 0"):
        store.read_chunk(0)


def test_read_chunk_of_a_missing_file(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    with pytest.raises(IndexFormatError, match="cannot read"):
        store.read_chunk(0)


def test_truncated_chunk_is_removed_and_reported_missing(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec())
    _fill(store)
    torn = store.chunk_file(1)
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="cannot read"):
        store.read_chunk(1)
    assert store.finished_chunks() == [0, 2, 3]
    assert not torn.exists()
    assert store.missing_chunks() == [1]
    assert not store.is_complete()
    # The other chunks are untouched and still readable.
    assert store.read_chunk(0).positions.tolist() == [0, 1, 2]


def test_finished_chunks_ignores_other_shards_and_stray_files(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=10, chunk_size=3, shard_index=1, num_shards=2))
    assert list(store.spec.chunk_numbers()) == [2, 3]
    _fill(store)
    chunks = tmp_path / "x" / CHUNKS_DIR
    (chunks / "chunk-000000.npz").write_bytes(b"from another shard")  # not ours: neither counted nor deleted
    (chunks / "chunk-12.npz").write_bytes(b"bad name")
    (chunks / ".chunk-000002.npz.tmp-abc").write_bytes(b"leftover temp")
    assert store.finished_chunks() == [2, 3]
    assert store.is_complete()
    assert (chunks / "chunk-000000.npz").exists()


# --- combine_stores ----------------------------------------------------------------------------------------


def _shards(tmp_path, num_shards: int = 2, gallery_count: int = 7, chunk_size: int = 2, **spec) -> list:
    stores = []
    for i in range(num_shards):
        store = EmbeddingStore.open_for(tmp_path / f"shard{i}", _spec(gallery_count, chunk_size, i, num_shards, **spec))
        stores.append(store)
    return stores


def test_combine_two_shards_in_gallery_order(tmp_path):
    first, second = _shards(tmp_path)
    assert list(first.spec.chunk_numbers()) == [0, 1]
    assert list(second.spec.chunk_numbers()) == [2, 3]
    _fill(first, skip=frozenset({1}))
    _fill(second, skip=frozenset({5}))
    for stores in ([first, second], [second, first]):  # argument order does not matter
        combined = combine_stores(stores)
        kept = [0, 2, 3, 4, 6]
        assert len(combined) == 5
        assert combined.positions.dtype == np.int64
        assert combined.positions.tolist() == kept
        assert combined.embeddings.dtype == np.float32
        assert combined.embeddings.flags["C_CONTIGUOUS"]
        expected = np.concatenate(
            [first.read_chunk(c).embeddings for c in (0, 1)] + [second.read_chunk(c).embeddings for c in (2, 3)]
        )
        np.testing.assert_array_equal(combined.embeddings, expected)
        np.testing.assert_array_equal(combined.embeddings, np.stack([_vector(p) for p in kept]))
        assert combined.rows == [_row(p) for p in kept]
        assert combined.skipped.skipped == [
            ("/gallery/1.png", "not a recognised image format"),
            ("/gallery/5.png", "not a recognised image format"),
        ]


def test_combine_a_single_complete_store(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "all", _spec(gallery_count=5, chunk_size=2))
    _fill(store)
    combined = combine_stores([store])
    assert combined.positions.tolist() == [0, 1, 2, 3, 4]
    assert combined.spec.encoder_id == "enc-a"
    assert len(combined.skipped) == 0


def test_combine_shards_with_an_empty_shard(tmp_path):
    stores = _shards(tmp_path, num_shards=5, gallery_count=5, chunk_size=2)
    for store in stores:
        _fill(store)
    assert stores[0].is_complete() and list(stores[0].spec.chunk_numbers()) == []
    combined = combine_stores(stores)
    assert combined.positions.tolist() == [0, 1, 2, 3, 4]


def test_combine_refuses_an_unfinished_shard(tmp_path):
    first, second = _shards(tmp_path)
    _fill(first)
    _fill(second, chunks=[2])
    with pytest.raises(ExtractionMismatchError, match="unfinished: 1 of 2 chunks missing") as info:
        combine_stores([first, second])
    assert "--shard 1/2" in str(info.value)


def test_combine_refuses_overlapping_shards(tmp_path):
    first, _ = _shards(tmp_path)
    _fill(first)
    twin = EmbeddingStore.open_for(tmp_path / "twin", first.spec)
    _fill(twin)
    with pytest.raises(ExtractionMismatchError, match="both hold chunk 0"):
        combine_stores([first, twin])
    with pytest.raises(ExtractionMismatchError, match="both hold chunk 0"):
        combine_stores([first, first])


def test_combine_refuses_a_missing_shard(tmp_path):
    first, second = _shards(tmp_path)
    _fill(first)
    _fill(second)
    with pytest.raises(ExtractionMismatchError, match="leave 2 of 4 chunks uncovered") as info:
        combine_stores([first])
    assert "chunk 2, gallery positions 4+" in str(info.value)


def test_combine_refuses_stores_of_different_encoders(tmp_path):
    first, _ = _shards(tmp_path)
    other = EmbeddingStore.open_for(tmp_path / "other", _spec(7, 2, 1, 2, encoder_id="enc-b"))
    _fill(first)
    _fill(other)
    with pytest.raises(ExtractionMismatchError, match="encoder_id: 'enc-a' vs 'enc-b'"):
        combine_stores([first, other])


def test_combine_refuses_no_stores():
    with pytest.raises(ExtractionMismatchError, match="no extraction directories"):
        combine_stores([])


def test_combine_accepts_shards_with_different_batch_sizes(tmp_path):
    first = EmbeddingStore.open_for(tmp_path / "a", _spec(7, 2, 0, 2, batch_size=2))
    second = EmbeddingStore.open_for(tmp_path / "b", _spec(7, 2, 1, 2, batch_size=16))
    _fill(first)
    _fill(second)
    assert combine_stores([first, second]).positions.tolist() == list(range(7))


def test_metadata_rows_shift_ids(tmp_path):
    store = EmbeddingStore.open_for(tmp_path / "x", _spec(gallery_count=4, chunk_size=2))
    store.write_chunk(0, np.array([0, 1]), np.zeros((2, DIM)), [_row(0), {"path": "/bare.png"}], [])
    store.write_chunk(1, np.array([3]), np.zeros((1, DIM)), [_row(3)], [("/gallery/2.png", "bad")])
    combined = combine_stores([store])
    rows = combined.metadata_rows(id_offset=100)
    assert [r.id for r in rows] == [100, 101, 103]
    assert rows[0].path == "/gallery/0.png"
    assert rows[0].labels == {"fine": "class-0"}
    assert rows[0].extra == {"n": 0}
    assert rows[1].path == "/bare.png"
    assert rows[1].labels == {} and rows[1].extra == {}
    assert [r.id for r in combined.metadata_rows()] == [0, 1, 3]
