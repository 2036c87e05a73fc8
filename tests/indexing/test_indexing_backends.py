"""One test module, every vector backend: the same gallery built into FAISS and into Qdrant (local mode) answers alike.

Each test runs once per backend (``backend`` fixture); the comparisons build the other backend's index too and
check the hits are the same items with the same scores, metadata and levels. Qdrant runs in qdrant-client's
local mode on a directory under ``tmp_path`` (no server); the tests skip when qdrant-client is not installed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexing.append import add_to_index
from indexing.builder import build_index
from indexing.calibrate_index import calibrate_index
from indexing.errors import IndexFormatError, UnknownLevelError
from indexing.extract import extract_embeddings
from indexing.index_dir import MANIFEST_FILE, open_index_dir
from indexing.vector_index import LabelFilter
from models import load_encoder
from retrieval.data.datasets import CsvImageDataset

COLOURS = {"red": (220, 30, 30), "orange": (230, 140, 20), "green": (30, 200, 40), "blue": (20, 40, 230)}
MIDDLE = {"red": "warm", "orange": "warm", "green": "cool", "blue": "cool"}
BACKENDS = ["faiss", "qdrant"]


def _write_gallery(root: Path, count: int, seed: int, prefix: str) -> Path:
    """``count`` noisy colour patches (fine = colour, middle = warm/cool, coarse = one class) and their CSV."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        fine = list(COLOURS)[i % len(COLOURS)]
        name = f"{prefix}_{i}.png"
        pixels = np.clip(np.array(COLOURS[fine]) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        y, x = rng.integers(0, 20, 2)
        pixels[y : y + 16, x : x + 16] = 255 - pixels[y : y + 16, x : x + 16]
        Image.fromarray(pixels).save(root / name)
        rows.append({"path": name, "fine": fine, "middle": MIDDLE[fine], "coarse": "colour"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "middle", "coarse"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def galleries(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backend-galleries")
    return {
        "gallery": _write_gallery(root / "gallery", 24, seed=0, prefix="g"),
        "more": _write_gallery(root / "more", 6, seed=1, prefix="m"),
        "validation": _write_gallery(root / "validation", 16, seed=2, prefix="v"),
    }


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "qdrant":
        pytest.importorskip("qdrant_client")
    return request.param


def _options(backend: str, tmp_path: Path, collection: str = "gallery") -> dict[str, Any]:
    return {"url": str(tmp_path / "qdrant-storage"), "collection": collection} if backend == "qdrant" else {}


def _build(backend: str, checkpoint: Path, gallery: Path, out: Path, tmp_path: Path, **kwargs: Any) -> Path:
    build_index(
        checkpoint,
        CsvImageDataset(gallery),
        out,
        batch_size=8,
        progress=False,
        backend=backend,
        backend_options=_options(backend, tmp_path, **kwargs),
    )
    return out


def _queries(checkpoint: Path, gallery: Path) -> np.ndarray:
    return extract_embeddings(load_encoder(checkpoint), CsvImageDataset(gallery), progress=False).embeddings


def _hits(results: list[Any]) -> list[list[tuple[int, float, str | None, dict, str | None]]]:
    return [[(hit.id, hit.score, hit.path, dict(hit.labels), hit.level) for hit in res] for res in results]


def _assert_same_hits(ours: list[Any], reference: list[Any]) -> None:
    """Same items in the same order with the same metadata and levels; scores equal to float32 precision."""
    assert len(ours) == len(reference)
    for mine, theirs in zip(_hits(ours), _hits(reference), strict=True):
        assert [h[0] for h in mine] == [h[0] for h in theirs]
        assert [h[2:] for h in mine] == [h[2:] for h in theirs]
        np.testing.assert_allclose([h[1] for h in mine], [h[1] for h in theirs], atol=1e-5)


@pytest.fixture(scope="module")
def faiss_reference(tiny_checkpoint, galleries, tmp_path_factory) -> Path:
    """The FAISS index every backend is compared with."""
    tmp_path = tmp_path_factory.mktemp("faiss-reference")
    return _build("faiss", tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)


def test_every_backend_answers_like_faiss(backend, tiny_checkpoint, galleries, faiss_reference, tmp_path):
    out = _build(backend, tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    queries = _queries(tiny_checkpoint, galleries["validation"])
    with open_index_dir(out) as ours, open_index_dir(faiss_reference) as reference:
        assert ours.manifest.backend == backend and ours.index.backend == backend
        assert len(ours) == len(reference) == 24
        _assert_same_hits(ours.search(queries, k=10), reference.search(queries, k=10))
        every_score = [hit.score for res in reference.search(queries, k=24) for hit in res]
        threshold = float(np.median(every_score))  # the random tiny encoder's scores crowd: cut at their median
        found, _ = ours.search_above(queries, threshold)
        expected, _ = reference.search_above(queries, threshold)
        _assert_same_hits(found, expected)
        assert sum(len(res) for res in found) > 0  # the threshold keeps some hits and drops others
        assert sum(len(res) for res in found) < 24 * len(queries)


def test_label_filters_return_the_best_matching_items_on_every_backend(
    backend, tiny_checkpoint, galleries, faiss_reference, tmp_path
):
    out = _build(backend, tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    queries = _queries(tiny_checkpoint, galleries["validation"])
    warm = LabelFilter("middle", ("warm",))
    with open_index_dir(out) as ours, open_index_dir(faiss_reference) as reference:
        filtered = ours.search(queries, k=5, where=warm)
        for res in filtered:
            assert len(res) == 5 and all(hit.labels["middle"] == "warm" for hit in res)
        # the best 5 warm items are the warm items among the unfiltered ranking, in its order
        unfiltered = ours.search(queries, k=24)
        for got, every in zip(filtered, unfiltered, strict=True):
            assert list(got.ids) == [hit.id for hit in every if hit.labels["middle"] == "warm"][:5]
        _assert_same_hits(filtered, reference.search(queries, k=5, where=warm))
        # two filters: both must match; several values: any of them
        both = [warm, LabelFilter("fine", ("orange", "blue"))]
        for res in ours.search(queries, k=10, where=both):
            assert res.ids and all(hit.labels["fine"] == "orange" for hit in res)
        above, _ = ours.search_above(queries, 0.0, where=LabelFilter("fine", ("green",)))
        assert all(hit.labels["fine"] == "green" for res in above for hit in res)
        with pytest.raises(UnknownLevelError, match="middle"):
            ours.search(queries, k=3, where=LabelFilter("colour", ("red",)))


def test_granularity_search_after_calibration_matches_faiss(
    backend, tiny_checkpoint, galleries, faiss_reference, tmp_path
):
    out = _build(backend, tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    reference = tmp_path / "reference"
    _build("faiss", tiny_checkpoint, galleries["gallery"], reference, tmp_path / "ref")
    ours_cal = calibrate_index(out, galleries["validation"], progress=False)
    ref_cal = calibrate_index(reference, galleries["validation"], progress=False)
    assert ours_cal.calibration.thresholds == pytest.approx(ref_cal.calibration.thresholds, abs=1e-5)
    queries = _queries(tiny_checkpoint, galleries["validation"])
    with open_index_dir(out) as ours, open_index_dir(reference) as theirs:
        assert ours.manifest.backend == backend  # calibrating rewrote the manifest and kept the backend
        for level in ("fine", "middle"):
            _assert_same_hits(
                ours.search(queries, 10, granularity=level), theirs.search(queries, 10, granularity=level)
            )


def test_index_add_extends_every_backend(backend, tiny_checkpoint, galleries, tmp_path):
    out = _build(backend, tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    summary = add_to_index(out, CsvImageDataset(galleries["more"]), batch_size=4, progress=False)
    assert summary.first_id == 24 and summary.count == 30
    queries = _queries(tiny_checkpoint, galleries["more"])
    with open_index_dir(out) as directory:
        assert directory.manifest.backend == backend and len(directory) == 30
        assert sorted(directory.index.ids().tolist()) == list(range(30))
        results = directory.search(queries, k=1)
    for i, res in enumerate(results):
        assert res[0].id == 24 + i and res[0].score == pytest.approx(1.0, abs=1e-4)
        assert Path(res[0].path).name == f"m_{i}.png"


def test_faiss_manifests_stay_readable_by_releases_without_backends(tiny_checkpoint, galleries, faiss_reference):
    """A FAISS directory's manifest carries no backend fields, so older releases (strict fields) still open it."""
    import json

    written = json.loads((faiss_reference / MANIFEST_FILE).read_text())
    assert "backend" not in written and "backend_options" not in written
    with open_index_dir(faiss_reference) as directory:
        assert directory.manifest.backend == "faiss"


def test_qdrant_rebuild_moves_the_alias_and_drops_the_old_collection(tiny_checkpoint, galleries, tmp_path):
    pytest.importorskip("qdrant_client")
    out = _build("qdrant", tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    with open_index_dir(out) as directory:
        first = directory.manifest.backend_options
        client = directory.index.client
        assert client.get_collection(first["collection"]).points_count == 24  # the alias reads the live one
    _build("qdrant", tiny_checkpoint, galleries["more"], out, tmp_path)
    with open_index_dir(out) as directory:
        second = directory.manifest.backend_options
        assert second["collection"] == first["collection"] and second["physical"] != first["physical"]
        assert len(directory) == 6
        names = {c.name for c in directory.index.client.get_collections().collections}
    assert second["physical"] in names and first["physical"] not in names


def test_a_failed_qdrant_write_leaves_the_previous_index_and_no_new_collection(
    tiny_checkpoint, galleries, tmp_path, monkeypatch
):
    pytest.importorskip("qdrant_client")
    from indexing.metadata import MetadataStore

    out = _build("qdrant", tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    with open_index_dir(out) as directory:
        before = directory.manifest.backend_options
        client = directory.index.client
    collections_before = {c.name for c in client.get_collections().collections}

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (simulated)")

    # fails inside the atomic directory write, after the new collection was filled
    monkeypatch.setattr(MetadataStore, "add_many", crash)
    with pytest.raises(OSError, match="disk full"):
        _build("qdrant", tiny_checkpoint, galleries["more"], out, tmp_path)
    monkeypatch.undo()
    assert {c.name for c in client.get_collections().collections} == collections_before
    with open_index_dir(out) as directory:
        assert directory.manifest.backend_options == before and len(directory) == 24


def test_a_missing_qdrant_collection_is_a_clear_error(tiny_checkpoint, galleries, tmp_path):
    pytest.importorskip("qdrant_client")
    out = _build("qdrant", tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    with open_index_dir(out) as directory:
        physical = directory.manifest.backend_options["physical"]
        directory.index.client.delete_collection(physical)
    with pytest.raises(IndexFormatError, match=physical):
        open_index_dir(out)


def test_the_cli_builds_adds_and_searches_a_qdrant_index(tiny_checkpoint, galleries, tmp_path):
    """``index build --backend qdrant``, ``index add`` and ``search --where`` through the real CLI."""
    pytest.importorskip("qdrant_client")
    import json

    from typer.testing import CliRunner

    from retrieval.cli.main import app

    runner = CliRunner()
    out, storage = tmp_path / "index", tmp_path / "qdrant-storage"
    build = ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(galleries["gallery"])]
    built = runner.invoke(app, [*build, "--out", str(out), "--backend", "qdrant", "--qdrant-url", str(storage)])
    assert built.exit_code == 0, built.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["backend"] == "qdrant" and manifest["backend_options"]["collection"] == "index"
    assert not (out / "index.faiss").exists()
    added = runner.invoke(app, ["index", "add", str(out), "--images", str(galleries["more"]), "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.output)["count"] == 30
    query = galleries["more"].parent / "m_1.png"
    found = runner.invoke(
        app, ["search", "--index", str(out), str(query), "--where", "fine=orange", "--json", "--k", "3"]
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)["results"][0]["hits"]
    assert hits[0]["id"] == 25 and all(hit["labels"]["fine"] == "orange" for hit in hits)
    info = runner.invoke(app, ["index", "info", str(out)])
    assert info.exit_code == 0, info.output
    assert "qdrant (url " in info.output and "collection index" in info.output
    verified = runner.invoke(app, ["index", "verify", str(out)])
    assert verified.exit_code == 0 and "30 items" in verified.output, verified.output
    # Qdrant options without the backend, and a backend without its URL, are refused before any work
    refused = runner.invoke(app, [*build, "--out", str(tmp_path / "x"), "--qdrant-url", str(storage)])
    assert refused.exit_code == 2 and "--backend qdrant" in refused.output
    refused = runner.invoke(app, [*build, "--out", str(tmp_path / "x"), "--backend", "qdrant"])
    assert refused.exit_code == 2 and "--qdrant-url" in refused.output


def test_a_failed_publish_keeps_the_written_directory_and_warns(
    tiny_checkpoint, galleries, tmp_path, monkeypatch, caplog
):
    """The directory is complete before the alias moves: a server lost at that moment costs the alias only."""
    pytest.importorskip("qdrant_client")
    from indexing.qdrant_index import QdrantIndex

    def unreachable(self: Any, previous: Any) -> None:
        raise ConnectionError("server went away (simulated)")

    monkeypatch.setattr(QdrantIndex, "publish", unreachable)
    with caplog.at_level("WARNING", logger="indexing.index_dir"):
        out = _build("qdrant", tiny_checkpoint, galleries["gallery"], tmp_path / "index", tmp_path)
    assert "could not make it live" in caplog.text and "server went away" in caplog.text
    queries = _queries(tiny_checkpoint, galleries["gallery"])[:3]
    with open_index_dir(out) as directory:
        assert len(directory) == 24
        assert [res[0].id for res in directory.search(queries, k=1)] == [0, 1, 2]
        assert directory.index.alias_target() is None  # the alias was never made


def test_merging_shards_into_every_backend_streams_the_same_index(
    backend, tiny_checkpoint, galleries, faiss_reference, tmp_path
):
    """``index merge`` adds the shards chunk by chunk to either backend, labels included, and answers as a build."""
    from indexing.builder import merge_shards
    from indexing.extract_job import ExtractOptions, extract_shard

    options = ExtractOptions(batch_size=4, chunk_size=5, progress=False, runtime="torch")
    dataset = CsvImageDataset(galleries["gallery"])
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        extract_shard(tiny_checkpoint, dataset, shard, (i, 2), options)
    out = tmp_path / "merged"
    merge_shards(shards, out, progress=False, backend=backend, backend_options=_options(backend, tmp_path))
    queries = _queries(tiny_checkpoint, galleries["validation"])
    warm = LabelFilter("middle", ("warm",))
    with open_index_dir(out) as merged, open_index_dir(faiss_reference) as reference:
        assert merged.manifest.backend == backend and merged.manifest.history[0]["shards"] == 2
        _assert_same_hits(merged.search(queries, k=10), reference.search(queries, k=10))
        _assert_same_hits(merged.search(queries, k=5, where=warm), reference.search(queries, k=5, where=warm))
