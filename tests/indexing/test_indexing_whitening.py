"""Descriptor whitening: the maths against naive references, the file, and whitened index directories end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexing.builder import build_index, merge_shards
from indexing.errors import IndexFormatError
from indexing.extract import extract_embeddings
from indexing.extract_job import ExtractOptions, extract_shard
from indexing.index_dir import WHITENING_FILE, open_index_dir
from indexing.manifest import Manifest
from indexing.verify import verify_index_dir
from indexing.whitening import (
    DEFAULT_SHRINKAGE,
    WHITENING_METHODS,
    Whitening,
    WhiteningError,
    fit_learned_whitening,
    fit_pca_whitening,
    fit_whitening,
    load_whitening,
    matching_pairs,
)
from models import load_encoder
from retrieval.config import ConfigError
from retrieval.data.gallery import open_gallery
from retrieval.registry import UnknownNameError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors crowded in a narrow cone with very uneven variance: what whitening is for."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.geomspace(3.0, 0.05, d) + np.r_[8.0, np.zeros(d - 1)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _classes(n_classes: int, per_class: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of ``n_classes`` classes whose within-class spread differs by direction."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * 2.0
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + rng.normal(size=(len(labels), d)) * np.linspace(0.05, 1.5, d)
    return x.astype(np.float32), labels


def _whitened(x: np.ndarray, w: Whitening) -> np.ndarray:
    """Projection before normalisation, in float64."""
    return (x.astype(np.float64) - w.mean) @ w.projection.T.astype(np.float64)


# ------------------------------------------------------------------------------------------------ PCA


def test_pca_whitened_fitting_data_has_identity_covariance_on_kept_dims():
    x = _anisotropic(2000, 16)
    w = fit_pca_whitening(x, shrinkage=0.0)
    assert (w.method, w.dim_in, w.dim_out, w.count) == ("pca", 16, 16, 2000)
    y = _whitened(x, w)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=2e-3)
    # the first rows are the largest-variance directions of the data: a naive eigen-decomposition agrees
    values, vectors = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    top = vectors[:, -1] / np.sqrt(values[-1])
    assert abs(abs(float(w.projection[0].astype(np.float64) @ top)) - float(top @ top)) < 1e-3 * float(top @ top)
    # keeping fewer dims keeps the leading rows
    w4 = fit_pca_whitening(x, dim=4, shrinkage=0.0)
    np.testing.assert_allclose(w4.projection, w.projection[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.cov(_whitened(x, w4), rowvar=False), np.eye(4), atol=2e-3)


def test_pca_shrinkage_scales_each_direction_by_its_variance_over_variance_plus_eps():
    x = _anisotropic(300, 12, seed=1)
    w = fit_pca_whitening(x)  # default shrinkage
    eps = w.details["eps"]
    cov = np.cov(x.astype(np.float64), rowvar=False)
    assert eps == pytest.approx(DEFAULT_SHRINKAGE * np.trace(cov) / 12, rel=1e-9)
    values = np.sort(np.linalg.eigvalsh(cov))[::-1]
    whitened_cov = np.cov(_whitened(x, w), rowvar=False)
    np.testing.assert_allclose(np.diag(whitened_cov), values / (values + eps), rtol=1e-3, atol=1e-6)
    # no direction is amplified beyond 1/sqrt(eps): noise directions of a small set are not blown up
    assert np.linalg.norm(w.projection.astype(np.float64), 2) <= 1 / np.sqrt(eps) * (1 + 1e-5)
    exact = fit_pca_whitening(x, shrinkage=0.0)
    assert np.linalg.norm(exact.projection.astype(np.float64), 2) > 3 / np.sqrt(eps)


def test_rank_is_at_most_n_minus_1_and_dims_beyond_it_are_refused():
    x = _anisotropic(10, 32, seed=2)  # 10 vectors span 9 directions once centred
    w = fit_pca_whitening(x, shrinkage=0.0)
    assert w.dim_out == 9 and w.details["rank"] == 9
    np.testing.assert_allclose(np.cov(_whitened(x, w), rowvar=False), np.eye(9), atol=1e-6)
    assert fit_pca_whitening(x, dim=5).dim_out == 5
    with pytest.raises(WhiteningError, match=r"dimension 10 is larger than the 9 directions"):
        fit_pca_whitening(x, dim=10)
    # duplicates add no direction
    doubled = np.concatenate([x, x])
    assert fit_pca_whitening(doubled).dim_out == 9
    # data in a 3-d subspace of a 32-d space: 3 directions, however many vectors
    rng = np.random.default_rng(3)
    flat = (rng.normal(size=(500, 3)) @ rng.normal(size=(3, 32))).astype(np.float32)
    assert fit_pca_whitening(flat).dim_out == 3


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.ones((1, 8), np.float32), "at least 2 vectors"),
        (np.ones((5, 8), np.float32), "all identical"),
        (np.where(np.eye(4, 8) > 0, np.nan, 0.0).astype(np.float32), "NaN or infinite"),
        (np.zeros((4,), np.float32), r"an \(n, D\) array"),
    ],
)
def test_fitting_errors_are_user_facing(x, message):
    with pytest.raises(WhiteningError, match=message):
        fit_pca_whitening(x)


def test_bad_dimension_and_shrinkage_are_refused():
    x = _anisotropic(50, 8)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(WhiteningError, match="positive integer"):
            fit_pca_whitening(x, dim=bad)
    with pytest.raises(WhiteningError, match="shrinkage"):
        fit_pca_whitening(x, shrinkage=-0.1)


# ------------------------------------------------------------------------------------------- learned


def _naive_learned(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Radenović et al.'s recipe as in their code: loops over pairs, inverse Cholesky, eigen of all data."""
    x = x.astype(np.float64)
    pairs = [(i, j) for i, j in combinations(range(len(x)), 2) if labels[i] == labels[j]]
    pair_cov = sum(np.outer(x[i] - x[j], x[i] - x[j]) for i, j in pairs) / len(pairs)
    inv_chol = np.linalg.inv(np.linalg.cholesky(pair_cov))
    centred = (x - x.mean(axis=0)) @ inv_chol.T
    _, vectors = np.linalg.eigh(centred.T @ centred / (len(x) - 1))
    return vectors[:, ::-1].T @ inv_chol


def test_learned_whitening_matches_a_naive_reference_and_whitens_matching_pairs():
    x, labels = _classes(12, 8, 10)
    w = fit_learned_whitening(x, labels, shrinkage=0.0)
    assert (w.method, w.dim_in, w.dim_out) == ("learned", 10, 10)
    assert w.details["pairs"] == 12 * 28 and w.details["classes"] == 12
    reference = _naive_learned(x, labels)
    # W differs (symmetric inverse square root vs inverse Cholesky) by a rotation, so P agrees up to row signs
    signs = np.sign(np.sum(reference * w.projection, axis=1))
    np.testing.assert_allclose(w.projection, signs[:, None] * reference, rtol=1e-4, atol=1e-5)
    i, j = np.array([(i, j) for i, j in combinations(range(len(x)), 2) if labels[i] == labels[j]]).T
    diffs = _whitened(x[i], w) - _whitened(x[j], w)
    np.testing.assert_allclose(diffs.T @ diffs / len(diffs), np.eye(10), atol=1e-4)
    # the kept directions come in decreasing order of (whitened) data variance
    variances = np.var(_whitened(x, w), axis=0, ddof=1)
    assert np.all(np.diff(variances) <= 1e-9)


def test_learned_whitening_improves_held_out_retrieval_when_nuisance_variance_dominates():
    # classes differ a little in every direction; within a class, a few nuisance directions vary a lot
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(30, 24)) * 0.5
    labels = np.repeat(np.arange(30), 6)

    def draw() -> np.ndarray:
        return (centres[labels] + rng.normal(size=(len(labels), 24)) * np.geomspace(0.05, 3.0, 24)).astype(np.float32)

    def r_at_1(v: np.ndarray) -> float:
        scores = v @ v.T
        np.fill_diagonal(scores, -np.inf)
        return float(np.mean(labels[scores.argmax(axis=1)] == labels))

    fitted = fit_learned_whitening(draw(), labels)
    held_out = draw()  # new instances of the same classes
    raw = r_at_1(held_out / np.linalg.norm(held_out, axis=1, keepdims=True))
    assert r_at_1(fitted.apply(held_out)) > raw + 0.3


def test_learned_whitening_needs_matching_pairs_and_one_label_per_vector():
    x, _ = _classes(5, 1, 6)
    with pytest.raises(WhiteningError, match="needs matching pairs"):
        fit_learned_whitening(x, np.arange(5))
    with pytest.raises(WhiteningError, match="one label per vector"):
        fit_learned_whitening(x, np.zeros(4, int))
    with pytest.raises(WhiteningError, match="needs a label per fitting vector"):
        fit_whitening("learned", x)
    # strings, with None / "" as unlabelled: those two join no pair but still count as fitting vectors
    x, labels = _classes(6, 4, 5)
    names = np.array([f"class-{c}" for c in labels], dtype=object)
    names[0], names[1] = None, ""
    w = fit_learned_whitening(x, names)
    assert w.details["pairs"] == 5 * 6 + 1 and w.count == 24


def test_matching_pairs_enumerate_every_pair_or_a_deterministic_sample():
    codes = np.array([2, 0, 2, 1, 0, 2, -1, 2, 5])
    first, second = matching_pairs(codes)
    brute = {(i, j) for i, j in combinations(range(len(codes)), 2) if codes[i] == codes[j] and codes[i] >= 0}
    assert set(zip(first.tolist(), second.tolist(), strict=True)) == brute and len(first) == len(brute) == 7
    many = np.repeat(np.arange(50), 40)  # 50 classes x 780 pairs = 39,000 pairs
    a = matching_pairs(many, max_pairs=1000, seed=3)
    b = matching_pairs(many, max_pairs=1000, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and len(a[0]) == 1000
    assert np.all(many[a[0]] == many[a[1]]) and np.all(a[0] < a[1])
    assert len(set(zip(a[0].tolist(), a[1].tolist(), strict=True))) == 1000
    assert len(np.unique(many[a[0]])) > 40  # spread over the classes, not the first few
    assert not np.array_equal(matching_pairs(many, max_pairs=1000, seed=4)[0], a[0])


# --------------------------------------------------------------------------------------- apply / file


def test_apply_gives_unit_float32_rows_and_refuses_bad_input():
    x = _anisotropic(100, 8)
    w = fit_pca_whitening(x, dim=6)
    y = w.apply(x.astype(np.float64))
    assert y.shape == (100, 6) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    expected = _whitened(x, w)
    np.testing.assert_allclose(y, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        w.apply(x[:, :7])
    with pytest.raises(ValueError, match="NaN"):
        w.apply(np.full((1, 8), np.inf, np.float32))
    with pytest.raises(ValueError, match="lies at the whitening mean"):
        w.apply(w.mean[None, :])


def test_save_load_round_trip_is_byte_stable_and_readable_by_safetensors(tmp_path):
    from safetensors.numpy import load_file

    x, labels = _classes(8, 5, 12)
    w = fit_learned_whitening(x, labels, dim=7, fitted_on="gallery test.csv")
    digest = w.save(tmp_path / WHITENING_FILE)
    assert digest == hashlib.sha256((tmp_path / WHITENING_FILE).read_bytes()).hexdigest()
    assert w.to_bytes() == fit_learned_whitening(x, labels, dim=7, fitted_on="gallery test.csv").to_bytes()
    loaded = load_whitening(tmp_path / WHITENING_FILE, digest)
    assert loaded.describe() == w.describe() and loaded.details == w.details
    assert np.array_equal(loaded.mean, w.mean) and np.array_equal(loaded.projection, w.projection)
    np.testing.assert_array_equal(loaded.apply(x), w.apply(x))
    arrays = load_file(str(tmp_path / WHITENING_FILE))
    assert arrays["projection"].shape == (7, 12) and arrays["mean"].dtype == np.float32


def test_a_modified_or_malformed_whitening_file_is_refused_naming_it(tmp_path):
    w = fit_pca_whitening(_anisotropic(40, 8))
    path = tmp_path / WHITENING_FILE
    digest = w.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit of the projection
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=rf"{WHITENING_FILE} is corrupt or was modified"):
        load_whitening(path, digest)
    # without a checksum the parse itself must refuse what is not a whitening file
    for content in (b"\x10\x00", b"x" * 40, path.read_bytes()[:-8]):
        path.write_bytes(content)
        with pytest.raises(IndexFormatError, match=rf"{WHITENING_FILE} is not a valid whitening file"):
            load_whitening(path)
    from safetensors.numpy import save_file

    save_file({"mean": np.zeros(4, np.float32)}, str(path), metadata={"format": "retrieval-whitening"})
    with pytest.raises(IndexFormatError, match="not a valid whitening file"):
        load_whitening(path)
    with pytest.raises(IndexFormatError, match="cannot read"):
        load_whitening(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("method", WHITENING_METHODS.names())
def test_every_registered_method_fits_and_applies(method):
    x, labels = _classes(10, 6, 8)
    w = fit_whitening(method, x, labels, dim=5, fitted_on="registry")
    assert (w.method, w.dim_in, w.dim_out, w.fitted_on) == (method, 8, 5, "registry")
    np.testing.assert_allclose(np.linalg.norm(w.apply(x), axis=1), 1.0, atol=1e-5)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="valid names: learned, pca"):
        fit_whitening("zca", _anisotropic(10, 4))


# ------------------------------------------------------------------------------- whitened index dirs

FINE = ["red", "green", "blue", "yellow"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "yellow": (230, 220, 30)}


def _write_gallery(root: Path, count: int, seed: int) -> Path:
    """``count`` noisy colour patches (fine = colour, 4 classes) and their labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        fine = FINE[i % 4]
        pixels = np.clip(np.array(COLOURS[fine]) + rng.normal(0, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
        y, x = rng.integers(0, 18, 2)
        pixels[y : y + 14, x : x + 14] = 255 - pixels[y : y + 14, x : x + 14]
        Image.fromarray(pixels).save(root / f"img_{i}.png")
        rows.append({"path": f"img_{i}.png", "fine": fine, "coarse": "warm" if fine in ("red", "yellow") else "cool"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "coarse"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def gallery_csv(tmp_path_factory) -> Path:
    return _write_gallery(tmp_path_factory.mktemp("wgallery"), 16, seed=0)


@pytest.fixture(scope="module")
def raw_embeddings(tiny_checkpoint, gallery_csv) -> np.ndarray:
    encoder = load_encoder(tiny_checkpoint)  # batches as in the builds below, so the vectors agree to the last bits
    return extract_embeddings(encoder, open_gallery(gallery_csv), batch_size=8, progress=False).embeddings


@pytest.fixture(scope="module")
def pca_index(tiny_checkpoint, gallery_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pca_index") / "index"
    build_index(tiny_checkpoint, open_gallery(gallery_csv), out, batch_size=8, progress=False, whiten="pca")
    return out


def _stored(index_path: Path) -> np.ndarray:
    with open_index_dir(index_path) as directory:
        ids, vectors = directory.index.reconstruct_all()
    return vectors[np.argsort(ids)]


def test_a_whitened_index_stores_whitened_vectors_and_records_the_whitening(pca_index, raw_embeddings):
    manifest = Manifest.read(pca_index / "manifest.json")
    info = manifest.whitening
    assert info is not None and info.method == "pca" and info.file == WHITENING_FILE
    assert (info.dim_in, info.dim_out, info.count) == (32, 15, 16)  # 16 images span 15 directions
    assert manifest.dim == 15 and manifest.query_dim == 32
    assert info.sha256 == hashlib.sha256((pca_index / WHITENING_FILE).read_bytes()).hexdigest()
    assert info.fitted_on.startswith("gallery ")
    whitening = load_whitening(pca_index / WHITENING_FILE, info.sha256)
    np.testing.assert_allclose(_stored(pca_index), whitening.apply(raw_embeddings), atol=1e-5)
    # the fit is the one fit_pca_whitening gives on the gallery's own embeddings
    np.testing.assert_allclose(whitening.projection, fit_pca_whitening(raw_embeddings).projection, atol=1e-5)
    with open_index_dir(pca_index) as directory:
        assert directory.query_dim == 32 and directory.dim == 15 and directory.whitening is not None
        assert WHITENING_FILE in directory.info()["files"] and directory.info()["whitening"]["method"] == "pca"


def test_searching_with_raw_query_embeddings_equals_whitening_by_hand_and_a_flat_search(pca_index, raw_embeddings):
    queries = raw_embeddings[[0, 5, 10]]
    with open_index_dir(pca_index) as directory:
        results = directory.search(queries, k=6)
        above, _ = directory.search_above(queries[:1], 0.2)
        whitened = directory.whitening.apply(queries)
        with pytest.raises(ValueError, match=r"shape \(Q, 32\)"):
            directory.search(whitened, k=3)  # already-whitened (15-d) vectors are not queries
    scores = whitened @ _stored(pca_index).T
    for row, hits in enumerate(results):
        order = np.argsort(-scores[row], kind="stable")[:6]
        assert list(hits.ids) == order.tolist()
        np.testing.assert_allclose(hits.scores, scores[row][order], atol=1e-5)
    assert sorted(np.flatnonzero(scores[0] > 0.2).tolist()) == sorted(above[0].ids)


def test_index_add_whitens_new_vectors_with_the_stored_whitening(tiny_checkpoint, pca_index, tmp_path):
    import shutil

    from indexing.append import add_to_index

    index = tmp_path / "index"
    shutil.copytree(pca_index, index)
    before = (index / WHITENING_FILE).read_bytes()
    more = _write_gallery(tmp_path / "more", 5, seed=9)
    summary = add_to_index(index, open_gallery(more), batch_size=4, progress=False)
    assert summary.whitening == "pca" and summary.count == 21 and summary.first_id == 16
    new_raw = extract_embeddings(load_encoder(tiny_checkpoint), open_gallery(more), progress=False).embeddings
    with open_index_dir(index) as directory:
        np.testing.assert_allclose(
            directory.index.reconstruct(np.arange(16, 21)), directory.whitening.apply(new_raw), atol=1e-5
        )
        (hit,) = directory.search(new_raw[:1], k=1)
        assert hit.ids[0] == 16
    assert (index / WHITENING_FILE).read_bytes() == before  # never refitted
    assert verify_index_dir(index).whitening == "verified"


def test_a_damaged_or_missing_whitening_file_is_refused_naming_it(pca_index, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(pca_index, index)
    assert verify_index_dir(index).whitening == "verified"
    data = bytearray((index / WHITENING_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (index / WHITENING_FILE).write_bytes(bytes(data))
    for check in (open_index_dir, verify_index_dir):
        with pytest.raises(IndexFormatError, match=rf"{WHITENING_FILE} is corrupt or was modified"):
            check(index)
    (index / WHITENING_FILE).unlink()
    with pytest.raises(IndexFormatError, match=rf"incomplete: {WHITENING_FILE} is missing"):
        open_index_dir(index)


def test_a_manifest_whose_whitening_disagrees_with_the_file_is_refused(pca_index, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(pca_index, index)
    payload = json.loads((index / "manifest.json").read_text())
    payload["whitening"]["method"] = "learned"
    (index / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(
        IndexFormatError, match=re.escape("holds a pca whitening 32 -> 15 but manifest.json records learned")
    ):
        open_index_dir(index)
    payload["whitening"]["dim_out"] = 14
    (index / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(IndexFormatError, match="dim_out 14 differs from the index dim 15"):
        open_index_dir(index)


def test_learned_whitening_from_gallery_labels_or_separate_images(tiny_checkpoint, gallery_csv, tmp_path):
    out = tmp_path / "learned"
    summary = build_index(
        tiny_checkpoint, open_gallery(gallery_csv), out, progress=False, whiten="learned", whiten_dim=6
    )
    assert summary.whitening["method"] == "learned" and summary.whitening["dim_out"] == 6
    assert summary.whitening["pairs"] == 4 * 6  # 4 colours x C(4, 2)
    assert Manifest.read(out / "manifest.json").dim == 6
    fit_set = _write_gallery(tmp_path / "fit", 12, seed=5)
    gallery = open_gallery(gallery_csv)
    separate = build_index(
        tiny_checkpoint, gallery, tmp_path / "sep", progress=False, whiten="pca", whiten_images=fit_set
    )
    assert separate.whitening["count"] == 12 and separate.whitening["dim_out"] == 11
    assert separate.whitening["fitted_on"] == f"images {fit_set}"


def test_whitening_options_are_checked_before_the_extraction(tiny_checkpoint, gallery_csv, tmp_path):
    unlabelled = tmp_path / "list.txt"
    unlabelled.write_text("\n".join(str(gallery_csv.parent / f"img_{i}.png") for i in range(4)) + "\n")
    cases = [
        ({"whiten": "learned"}, unlabelled, ConfigError, "carries no labels"),
        ({"whiten_dim": 4}, gallery_csv, ConfigError, "only apply with --whiten"),
        ({"whiten": "zca"}, gallery_csv, UnknownNameError, "valid names: learned, pca"),
        ({"whiten": "pca", "whiten_dim": 0}, gallery_csv, ConfigError, "positive integer"),
    ]
    for options, images, error, message in cases:
        out = tmp_path / "never"
        with pytest.raises(error, match=message):
            build_index(tiny_checkpoint, open_gallery(images), out, progress=False, **options)
        assert not out.exists() and not (tmp_path / "never.extract").exists()
    gallery = open_gallery(gallery_csv)
    with pytest.raises(WhiteningError, match="larger than the 15 directions"):
        build_index(tiny_checkpoint, gallery, tmp_path / "big", progress=False, whiten="pca", whiten_dim=20)
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_merged_shards_are_whitened_like_a_single_build(tiny_checkpoint, gallery_csv, pca_index, tmp_path):
    options = ExtractOptions(batch_size=8, chunk_size=8, progress=False)  # the batches of the single build
    gallery = open_gallery(gallery_csv)
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        extract_shard(tiny_checkpoint, gallery, shard, (i, 2), options)
    merge_shards(shards, tmp_path / "merged", whiten="pca")
    merged = Manifest.read(tmp_path / "merged" / "manifest.json")
    assert merged.whitening.dim_out == 15
    np.testing.assert_allclose(_stored(tmp_path / "merged"), _stored(pca_index), atol=1e-5)


def test_calibrating_a_whitened_index_scores_whitened_pairs_and_index_add_keeps_the_plot(
    tiny_checkpoint, gallery_csv, pca_index, raw_embeddings, tmp_path
):
    from indexing.append import add_to_index
    from indexing.calibrate_index import calibrate_index
    from indexing.calibration import calibrate_thresholds
    from indexing.calibration_plot import CALIBRATION_PLOT_FILE
    from retrieval.data.datasets import open_dataset

    index = tmp_path / "index"
    shutil.copytree(pca_index, index)
    result = calibrate_index(index, gallery_csv, progress=False)
    with open_index_dir(index) as directory:
        whitened = directory.whitening.apply(raw_embeddings)
    labels = open_dataset(gallery_csv).labels  # the CSV's order, as the extraction above
    expected = calibrate_thresholds(whitened, labels, schema=["fine", "coarse"])
    assert result.calibration.thresholds == pytest.approx(expected.thresholds, abs=1e-3)
    raw = calibrate_thresholds(raw_embeddings, labels, schema=["fine", "coarse"])
    assert result.calibration.thresholds != pytest.approx(raw.thresholds, abs=1e-3)  # the space matters
    plot = index / CALIBRATION_PLOT_FILE
    assert result.plot == plot and plot.is_file()

    add_to_index(index, open_gallery(gallery_csv), batch_size=8, progress=False)
    assert plot.is_file()  # the calibration stays with the index, and so does its plot
    with open_index_dir(index) as directory:
        assert directory.manifest.thresholds == result.calibration.thresholds
