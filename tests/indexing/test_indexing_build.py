"""build_index end to end: a tiny random encoder, a few PNGs on disk, one corrupt file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexing.builder import build_index, make_index
from indexing.extract import extract_embeddings
from indexing.faiss_index import SearchParams
from indexing.index_dir import open_index_dir, write_index_dir
from indexing.index_factory import parse_size
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow
from models import load_encoder, read_checkpoint_info
from retrieval.data.datasets import CsvImageDataset
from retrieval.data.transforms import build_transforms

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
CORRUPT = 3  # dataset position of the unreadable file


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Seven small PNGs (noisy colour patches with a square) and one file that is not an image."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        fine = list(COLOURS)[i % 3]
        name = f"img_{i}.png"
        if i == CORRUPT:
            (root / name).write_bytes(b"this is not a PNG")
        else:
            pixels = np.clip(np.array(COLOURS[fine]) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            y, x = rng.integers(0, 20, 2)
            pixels[y : y + 16, x : x + 16] = 255 - pixels[y : y + 16, x : x + 16]
            Image.fromarray(pixels).save(root / name)
        rows.append({"path": name, "fine": fine, "middle": "warm" if fine == "red" else "cool", "coarse": "colour"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "middle", "coarse"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def _reference_embeddings(checkpoint: Path, dataset: CsvImageDataset, indices: list[int]) -> np.ndarray:
    """Embed images one by one, outside the batched/skipping pipeline."""
    encoder = load_encoder(checkpoint)
    transform = build_transforms(encoder.config.preprocess, train=False)
    with torch.inference_mode():
        batch = torch.stack([transform(dataset.load_image(i)) for i in indices])
        return encoder(batch).numpy()


def test_extraction_skips_the_corrupt_file_and_matches_unbatched_encoding(tiny_checkpoint, gallery):
    dataset = CsvImageDataset(gallery)
    encoder = load_encoder(tiny_checkpoint)
    # batch_size=1 puts the corrupt file alone in a batch (no images at all); 3 does not divide 8.
    for batch_size in (1, 3):
        out = extract_embeddings(encoder, dataset, batch_size=batch_size, progress=False)
        kept = [i for i in range(8) if i != CORRUPT]
        assert out.indices.tolist() == kept and out.indices.dtype == np.int64
        assert out.embeddings.shape == (7, 32) and out.embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out.embeddings, _reference_embeddings(tiny_checkpoint, dataset, kept), atol=1e-5)
        assert len(out.skipped) == 1
        path, reason = out.skipped.skipped[0]
        assert path == dataset.names[CORRUPT] and "not a recognised image" in reason


def test_build_index_end_to_end(tiny_checkpoint, gallery, tmp_path):
    dataset = CsvImageDataset(gallery)
    out = tmp_path / "index"
    summary = build_index(tiny_checkpoint, dataset, out, batch_size=3, progress=False)

    assert summary.count == 7 and summary.out_path == out and summary.seconds > 0
    assert [p for p, _ in summary.skipped.skipped] == [dataset.names[CORRUPT]]
    skipped_tsv = (out / "skipped.tsv").read_text().splitlines()
    assert skipped_tsv[0] == "path\treason" and skipped_tsv[1].startswith(dataset.names[CORRUPT] + "\t")

    with open_index_dir(out) as directory:
        manifest = directory.manifest
        assert manifest.count == 7 and manifest.dim == 32 and manifest.skipped == 1
        assert manifest.encoder_id == read_checkpoint_info(tiny_checkpoint).encoder_id == summary.encoder_id
        assert manifest.encoder_path == str(tiny_checkpoint.resolve()) and Path(manifest.encoder_path).is_absolute()
        assert manifest.levels == ["fine", "middle", "coarse"]
        # the default factory is "auto": a small gallery gets exact search, and the manifest says why
        assert manifest.factory == "Flat" and summary.factory == "Flat"
        assert manifest.factory_reason.startswith("auto: ") and "exact search" in manifest.factory_reason
        assert manifest.search_params is None and manifest.tuning is None
        assert manifest.index_sha256 is not None and len(manifest.index_sha256) == 64

        kept = [i for i in range(8) if i != CORRUPT]
        queries = _reference_embeddings(tiny_checkpoint, dataset, kept)
        results = directory.search(queries, k=10)
    for position, res in zip(kept, results, strict=True):
        assert len(res) == 7 and CORRUPT not in res.ids
        assert res[0].id == position  # each gallery image finds itself first, under its dataset position
        assert res[0].score == pytest.approx(1.0, abs=1e-4)
        assert res[0].path == dataset.names[position]
        assert res[0].labels == dataset.label_names(position)


def test_build_index_refuses_a_gallery_with_no_readable_image(tiny_checkpoint, gallery, tmp_path):
    dataset = CsvImageDataset(gallery).subset([CORRUPT])
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        build_index(tiny_checkpoint, dataset, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()


def test_build_index_rejects_bad_factories_and_outputs_clearly(tiny_checkpoint, gallery, tmp_path):
    from indexing import IndexFormatError
    from retrieval.config import ConfigError

    dataset = CsvImageDataset(gallery)
    with pytest.raises(ConfigError, match="invalid FAISS index factory string 'Bogus'"):
        build_index(tiny_checkpoint, dataset, tmp_path / "a", factory="Bogus", progress=False)
    with pytest.raises(ConfigError, match="cannot be trained on"):  # more centroids than vectors
        build_index(tiny_checkpoint, dataset, tmp_path / "b", factory="IVF4096,Flat", progress=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(IndexFormatError, match="does not look like an index"):
        build_index(tiny_checkpoint, dataset, photos, progress=False)
    assert (photos / "keep.jpg").read_bytes() == b"precious"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_build_index_tunes_an_explicit_approximate_factory(tiny_checkpoint, gallery, tmp_path):
    dataset = CsvImageDataset(gallery)
    summary = build_index(tiny_checkpoint, dataset, tmp_path / "ivf", factory="IVF2,Flat", progress=False)
    assert summary.factory == "IVF2,Flat" and "given explicitly" in summary.factory_reason
    assert set(summary.search_params) == {"nprobe"} and 1 <= summary.search_params["nprobe"] <= 2
    # Half of the 7 readable images (3) are held out of the index while tuning, then added.
    assert summary.tuning["target_recall"] == 0.95 and summary.tuning["num_queries"] == 3
    assert summary.tuning["held_out"] is True and summary.count == 7
    with open_index_dir(tmp_path / "ivf") as directory:
        assert directory.manifest.search_params == summary.search_params
        assert directory.manifest.tuning == summary.tuning
        assert directory.index.default_params.nprobe == summary.search_params["nprobe"]


def test_build_index_refuses_a_memory_budget_with_a_given_factory(tiny_checkpoint, gallery, tmp_path):
    from retrieval.config import ConfigError

    with pytest.raises(ConfigError, match="only applies to factory 'auto'"):
        build_index(tiny_checkpoint, CsvImageDataset(gallery), tmp_path / "x", factory="Flat", memory_budget="1GB")
    with pytest.raises(ConfigError, match="cannot fit"):  # not even 4-byte PQ codes fit in 10 bytes
        build_index(tiny_checkpoint, CsvImageDataset(gallery), tmp_path / "x", memory_budget=10, progress=False)
    assert not (tmp_path / "x").exists()


def _unit_noise(n: int, d: int, seed: int) -> np.ndarray:
    """Unclustered vectors: neighbours spread over several IVF lists, so the tuned nprobe must exceed 1."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("factory", "budget", "expected"),
    # 35 kB: Flat (44.8 kB), the float32 (52.6 kB) and fp16 (39.8 kB) refine stores are too big, SQ8's fits
    [("IVF16,Flat", None, "IVF16,Flat"), ("auto", "35kB", "IVF8_HNSW32,PQ4x4fs,Refine(SQ8)")],
)
def test_tuned_params_round_trip_through_the_manifest_and_apply_at_search(tmp_path, factory, budget, expected):
    vectors, ids = _unit_noise(400, 16, seed=0), np.arange(400, dtype=np.int64) * 3
    built = make_index(vectors, ids, factory, memory_budget=budget, target_recall=0.9)
    assert built.factory == expected and built.tuning is not None and built.tuning.reached
    fields = built.manifest_fields()
    nprobe = fields["search_params"]["nprobe"]
    assert nprobe > 1  # FAISS's default of 1 would not reach the target on these vectors
    assert fields["tuning"]["recall"] >= 0.9 and fields["tuning"]["k"] == 10
    if budget is not None:
        assert fields["factory_reason"].startswith("auto: ") and "exceed the budget" in fields["factory_reason"]
    rows = (MetadataRow(id=int(i), path=f"g/{i}.png") for i in ids)
    write_index_dir(tmp_path / "idx", built.index, rows, Manifest(dim=16, count=400, encoder_id="e", **fields))

    queries = _unit_noise(30, 16, seed=1)
    with open_index_dir(tmp_path / "idx") as directory:
        manifest = directory.manifest
        assert manifest.search_params == fields["search_params"] and manifest.tuning == fields["tuning"]
        assert set(manifest.search_params) == ({"nprobe", "k_factor"} if "Refine" in expected else {"nprobe"})
        assert manifest.factory == expected and manifest.factory_reason == fields["factory_reason"]
        assert directory.index.default_params.nprobe == nprobe
        default = directory.index.search(queries, 10)
        explicit = directory.index.search(queries, 10, SearchParams.from_dict(fields["search_params"]))
        single = directory.index.search(queries, 10, SearchParams(nprobe=1))
    np.testing.assert_array_equal(default[1], explicit[1])
    assert not np.array_equal(default[1], single[1])  # the stored default really is the tuned value


def test_parse_size_reads_units_and_rejects_bad_text():
    from retrieval.config import ConfigError

    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("1.5g") == 1.5e9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("4096") == 4096 and parse_size(" 3 kb ") == 3000
    for bad in ("lots", "", "2XB", "-1GB", "0MB", "GB"):
        with pytest.raises(ConfigError, match="invalid size"):
            parse_size(bad)
