"""build_index end to end: a tiny random encoder, a few PNGs on disk, one corrupt file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexing.builder import build_index
from indexing.extract import extract_embeddings
from indexing.index_dir import open_index_dir
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
