"""Index directories: round trip, clear errors on bad directories, and crash safety under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from indexing.errors import IndexFormatError, NotCalibratedError, UnknownGranularityError
from indexing.faiss_index import FaissIndex
from indexing.index_dir import open_index_dir, write_index_dir
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow
from retrieval.data.images import CorruptImageError, SkipReport

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def _unit(seed: int, n: int, d: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(path: Path, seed: int, n: int, skipped: SkipReport | None = None) -> np.ndarray:
    vectors = _unit(seed, n)
    index = FaissIndex(DIM)
    index.add(vectors, np.arange(n) * 10)
    rows = (MetadataRow(id=i * 10, path=f"g/{i}.png", labels={"fine": f"f{i % 3}", "coarse": "c"}) for i in range(n))
    manifest = Manifest(dim=DIM, count=n, encoder_id=f"enc{seed}", levels=["fine", "coarse"])
    write_index_dir(path, index, rows, manifest, skipped=skipped)
    return vectors


def test_round_trip_search_matches_the_in_memory_index(tmp_path):
    report = SkipReport()
    report.add(CorruptImageError("g/bad.png", "not a recognised image format"))
    vectors = _write(tmp_path / "idx", seed=0, n=40, skipped=report)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "index.faiss",
        "manifest.json",
        "metadata.sqlite",
        "skipped.tsv",
    ]
    queries = _unit(1, 6)
    expected = queries @ vectors.T
    with open_index_dir(tmp_path / "idx") as directory:
        assert directory.manifest.encoder_id == "enc0" and len(directory) == 40
        results = directory.search(queries, 5)
        again = directory.search(queries, 5)
        info = directory.info()
    assert results == again
    assert len(results) == 6
    for q, res in enumerate(results):
        top = np.argsort(-expected[q])[:5]
        assert res.ids == (top * 10).tolist()
        np.testing.assert_allclose(res.scores, expected[q, top], atol=1e-5)
        hit = res[0]
        assert hit.path == f"g/{top[0]}.png"
        assert hit.labels == {"fine": f"f{top[0] % 3}", "coarse": "c"}
    assert info["count"] == 40 and info["dim"] == DIM and info["factory"] == "Flat"
    assert set(info["files"]) == {"manifest.json", "index.faiss", "metadata.sqlite", "skipped.tsv"}
    json.dumps(info)  # serialisable for `retrieval index info --json`


def test_search_checks_query_shape(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    with open_index_dir(tmp_path / "idx") as directory:
        with pytest.raises(ValueError, match=r"shape \(Q, 16\)"):
            directory.search(np.zeros((2, 8), np.float32), 3)
        assert len(directory.search(_unit(2, 1), 50)[0]) == 5  # k beyond the count gives every item


def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(IndexFormatError, match="index directory not found"):
        open_index_dir(tmp_path / "nowhere")
    _write(tmp_path / "idx", seed=0, n=5)
    (tmp_path / "idx" / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match=r"manifest\.json is missing"):
        open_index_dir(tmp_path / "idx")


def test_a_version_left_aside_by_a_crash_is_restored_on_open(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    (tmp_path / "idx").rename(tmp_path / ".idx.old-abc")  # as if killed between the two renames of a swap
    with open_index_dir(tmp_path / "idx") as directory:
        assert len(directory) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_version_set_aside_by_a_live_writer_is_left_alone_and_named(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    aside = tmp_path / f".idx.old-{os.getpid()}-abc"  # this process is alive: it may be between the renames
    (tmp_path / "idx").rename(aside)
    with pytest.raises(IndexFormatError, match=r"previous version was left at .*\.idx\.old-\d+-abc"):
        open_index_dir(tmp_path / "idx")
    assert aside.is_dir()


def test_missing_metadata_file(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    (tmp_path / "idx" / "metadata.sqlite").unlink()
    with pytest.raises(IndexFormatError, match=r"metadata\.sqlite is missing"):
        open_index_dir(tmp_path / "idx")


def _edit_manifest(path: Path, **changes) -> None:
    data = json.loads((path / "manifest.json").read_text())
    data.update(changes)
    (path / "manifest.json").write_text(json.dumps(data))


def test_unsupported_format_version(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    _edit_manifest(tmp_path / "idx", format_version=99, new_field_of_the_future=1)
    with pytest.raises(IndexFormatError, match=r"format version 99 is not supported \(this release reads 1\)"):
        open_index_dir(tmp_path / "idx")


def test_dim_mismatch_between_manifest_and_index(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    _edit_manifest(tmp_path / "idx", dim=32)
    with pytest.raises(IndexFormatError, match=r"manifest\.json says dim 32 but index\.faiss holds 16-dimensional"):
        open_index_dir(tmp_path / "idx")


def test_a_flipped_byte_in_the_index_file_is_a_clear_error(tmp_path):
    _write(tmp_path / "idx", seed=0, n=40)
    index_file = tmp_path / "idx" / "index.faiss"
    expected = json.loads((tmp_path / "idx" / "manifest.json").read_text())["index_sha256"]
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the vectors: FAISS itself would read it without complaint
    index_file.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=r"index\.faiss is corrupt or was modified") as err:
        open_index_dir(tmp_path / "idx")
    assert f"expects {expected[:12]}" in str(err.value)


def test_a_manifest_without_the_newer_optional_fields_still_loads(tmp_path):
    vectors = _write(tmp_path / "idx", seed=0, n=10)
    data = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert data["index_sha256"] and {"factory_reason", "search_params", "tuning", "calibration"} <= set(data)
    for field in ("index_sha256", "factory_reason", "search_params", "tuning", "calibration"):
        del data[field]
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(data))
    with open_index_dir(tmp_path / "idx") as directory:
        manifest = directory.manifest
        assert manifest.index_sha256 is None and manifest.factory_reason is None and manifest.search_params is None
        assert directory.search(vectors[:1], 1)[0][0].id == 0  # unchecked, but fully usable


def test_count_mismatch_and_invalid_manifest_field(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    _edit_manifest(tmp_path / "idx", count=6)
    with pytest.raises(IndexFormatError, match=r"says 6 items but index\.faiss holds 5"):
        open_index_dir(tmp_path / "idx")
    _edit_manifest(tmp_path / "idx", count=5, metric="l2")
    with pytest.raises(IndexFormatError, match="not a valid index manifest: metric"):
        open_index_dir(tmp_path / "idx")


def test_write_refuses_inconsistent_parts_and_keeps_the_old_index(tmp_path):
    _write(tmp_path / "idx", seed=0, n=5)
    index = FaissIndex(DIM)
    index.add(_unit(3, 4), np.arange(4))
    bad_rows = [MetadataRow(id=i) for i in (0, 1, 2, 99)]  # id 99 is not in the index
    manifest = Manifest(dim=DIM, count=4, encoder_id="new")
    with pytest.raises(IndexFormatError, match="do not cover exactly"):
        write_index_dir(tmp_path / "idx", index, bad_rows, manifest)
    with pytest.raises(IndexFormatError, match="manifest dim 8"):
        write_index_dir(tmp_path / "idx", index, [], manifest.model_copy(update={"dim": 8}))
    with open_index_dir(tmp_path / "idx") as directory:
        assert directory.manifest.encoder_id == "enc0" and len(directory) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary directory left behind


def test_write_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(IndexFormatError, match="does not look like an index"):
        _write(photos, seed=0, n=3)
    assert (photos / "holiday.jpg").read_bytes() == b"precious"


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from indexing.faiss_index import FaissIndex
    from indexing.index_dir import write_index_dir
    from indexing.manifest import Manifest
    from indexing.metadata import MetadataRow

    target, marker = Path(sys.argv[1]), Path(sys.argv[2])
    x = np.random.default_rng(7).standard_normal((9, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = FaissIndex(16)
    index.add(x, np.arange(9))

    def rows():
        for i in range(9):
            yield MetadataRow(id=i, path=f"new/{i}.png")
            if i == 4:  # half-way through the metadata: index.faiss is already in the temporary directory
                marker.write_text("writing")
                time.sleep(120)

    write_index_dir(target, index, rows(), Manifest(dim=16, count=9, encoder_id="new"))
    """
)


def test_killed_writer_leaves_the_previous_index_loadable(tmp_path):
    target = tmp_path / "idx"
    vectors = _write(target, seed=0, n=12)
    queries = _unit(5, 3)
    with open_index_dir(target) as directory:
        before = directory.search(queries, 4)

    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, f"writer exited early with code {child.returncode}"
            assert time.monotonic() < deadline, "writer never reached the middle of its write"
            time.sleep(0.05)
        temp_dirs = [p for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp-")]
        assert len(temp_dirs) == 1 and (temp_dirs[0] / "index.faiss").is_file()  # really mid-write
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with open_index_dir(target) as directory:
        assert directory.manifest.encoder_id == "enc0" and len(directory) == 12
        after = directory.search(queries, 4)
    assert after == before
    assert after[0].ids[0] == int(np.argmax(queries[0] @ vectors.T)) * 10

    # A later write succeeds despite the stale temporary directory the killed writer left behind.
    _write(target, seed=1, n=3)
    with open_index_dir(target) as directory:
        assert directory.manifest.encoder_id == "enc1" and len(directory) == 3


# --- calibration in the manifest and search at a granularity -----------------------------------------------

CALIBRATION = {
    "objective": "f1",
    "bins": 1024,
    "levels": [
        {"level": "fine", "threshold": 0.5, "precision": 0.9, "recall": 0.8, "f1": 0.85, "positives": 10,
         "pairs": 90, "raw_threshold": 0.5},
        {"level": "coarse", "threshold": 0.0, "precision": 0.7, "recall": 0.9, "f1": 0.79, "positives": 40,
         "pairs": 90, "raw_threshold": 0.0},
    ],
}  # fmt: skip


def test_manifest_round_trip_with_and_without_calibration(tmp_path):
    plain = Manifest(dim=DIM, count=3, encoder_id="e", levels=["fine", "coarse"])
    plain.write(tmp_path / "plain.json")
    assert Manifest.read(tmp_path / "plain.json") == plain
    assert plain.calibration is None and plain.calibrated() is None and plain.thresholds == {}

    calibrated = Manifest(dim=DIM, count=3, encoder_id="e", levels=["fine", "coarse"], calibration=CALIBRATION)
    assert calibrated.thresholds == {"fine": 0.5, "coarse": 0.0}  # filled from the calibration
    calibrated.write(tmp_path / "calibrated.json")
    again = Manifest.read(tmp_path / "calibrated.json")
    assert again == calibrated and again.calibrated().thresholds == calibrated.thresholds
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    # a manifest written before calibration existed (no "calibration" key) still loads
    legacy = json.loads((tmp_path / "plain.json").read_text())
    del legacy["calibration"]
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert Manifest.read(tmp_path / "legacy.json") == plain


def test_manifest_refuses_a_calibration_that_disagrees(tmp_path):
    base = {"format_version": 1, "dim": DIM, "count": 3, "encoder_id": "e", "levels": ["fine", "coarse"]}
    cases = [
        ({"calibration": CALIBRATION, "thresholds": {"fine": 0.6, "coarse": 0.0}}, "disagree"),
        ({"calibration": CALIBRATION, "levels": ["fine", "middle"]}, "differ from the index levels"),
        ({"calibration": {**CALIBRATION, "levels": CALIBRATION["levels"][::-1]}}, "ruler order"),
        ({"calibration": {"levels": "nope"}}, "calibration"),
    ]
    for extra, expected in cases:
        (tmp_path / "m.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(IndexFormatError, match=expected):
            Manifest.read(tmp_path / "m.json")


def test_search_at_a_granularity_filters_and_tags(tmp_path):
    vectors = _write(tmp_path / "idx", seed=5, n=40)
    with open_index_dir(tmp_path / "idx") as plain:
        (untagged,) = plain.search(vectors[:1], k=5)
        assert all(hit.level is None for hit in untagged) and "level" not in untagged[0].to_dict()
        with pytest.raises(NotCalibratedError, match="retrieval index calibrate"):
            plain.search(vectors[:1], k=5, granularity="fine")
        manifest = plain.manifest
    calibrated = Manifest.model_validate({**manifest.model_dump(), "calibration": CALIBRATION, "thresholds": {}})
    calibrated.write(tmp_path / "idx" / "manifest.json")

    queries = _unit(9, 6)
    with open_index_dir(tmp_path / "idx") as index_dir:
        full = index_dir.search(queries, k=40)
        coarse = index_dir.search(queries, k=40, granularity="coarse")
        fine_top3 = index_dir.search(queries, k=3, granularity="fine")
        with pytest.raises(UnknownGranularityError, match="calibrated for fine, coarse"):
            index_dir.search(queries, k=3, granularity="middle")
    for everything, kept, top3 in zip(full, coarse, fine_top3, strict=True):
        for hit in everything:
            assert hit.level == ("fine" if hit.score >= 0.5 else "coarse" if hit.score >= 0.0 else None)
        # reference: the whole ranking filtered at the threshold, then cut at k
        assert kept.ids == [h.id for h in everything if h.score >= 0.0]
        assert top3.ids == [h.id for h in everything if h.score >= 0.5][:3]
        assert all(hit.level == "fine" for hit in top3)
