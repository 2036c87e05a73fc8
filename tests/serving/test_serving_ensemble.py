"""An ensemble checkpoint (a DM² cohort as one encoder) through export, indexing and search, like any encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import Encoder, EncoderConfig, EnsembleEncoder, load_encoder, read_checkpoint_info, save_encoder
from models.onnx_export import example_images
from retrieval.data.datasets import CsvImageDataset
from retrieval.data.transforms import PreprocessConfig
from serving.engine import SearchEngine
from serving.export import PARITY_THRESHOLD, export_onnx
from serving.onnx_metadata import read_onnx_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEMBER_DIMS = (16, 8)


@pytest.fixture(scope="module")
def ensemble_checkpoint(tmp_path_factory) -> Path:
    """Two seeded random resnet10t members (different dims, one with the AML student's layout), 32 px."""
    torch.manual_seed(11)
    pre = PreprocessConfig(input_size=32)
    members = [
        Encoder(EncoderConfig(backbone="resnet10t", embedding_dim=MEMBER_DIMS[0], preprocess=pre)),
        Encoder(
            EncoderConfig(
                backbone="resnet10t", embedding_dim=MEMBER_DIMS[1], projection="before_pooling", preprocess=pre
            )
        ),
    ]
    path = tmp_path_factory.mktemp("ensemble") / "encoder"
    save_encoder(EnsembleEncoder.from_members(members, provenance={"purpose": "tests"}).eval(), path)
    return path


@pytest.fixture(scope="module")
def ensemble_onnx(ensemble_checkpoint, tmp_path_factory) -> Path:
    """The ensemble exported by serving's export (which itself refuses a parity cosine below the threshold)."""
    export = export_onnx(ensemble_checkpoint, tmp_path_factory.mktemp("ensemble_onnx") / "encoder.onnx")
    assert export.min_cosine >= PARITY_THRESHOLD
    return export.path


@pytest.fixture(scope="module")
def ensemble_index(ensemble_checkpoint, serving_gallery, tmp_path_factory) -> Path:
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery

    out = tmp_path_factory.mktemp("ensemble_index") / "index"
    build_index(ensemble_checkpoint, open_gallery(serving_gallery), out, batch_size=4, progress=False)
    return out


def test_onnx_runtime_reproduces_the_torch_ensemble(ensemble_checkpoint, ensemble_onnx):
    encoder = load_encoder(ensemble_checkpoint)
    pre = encoder.config.preprocess
    session = ort.InferenceSession(str(ensemble_onnx), providers=["CPUExecutionProvider"])
    for batch, size, seed in [(3, 32, 5), (2, 56, 6)]:
        images = example_images(pre.mean, pre.std, batch=batch, size=size, seed=seed)
        with torch.no_grad():
            expected = encoder(images).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        assert got.shape == (batch, sum(MEMBER_DIMS))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    info = read_onnx_metadata(ensemble_onnx, verify=True)
    assert info.encoder_id == read_checkpoint_info(ensemble_checkpoint).encoder_id
    assert info.embedding_dim == sum(MEMBER_DIMS) and info.preprocess.input_size == 32


def test_an_ensemble_index_finds_each_gallery_image_first(ensemble_index, ensemble_onnx, serving_gallery):
    gallery = CsvImageDataset(serving_gallery)
    images = [gallery.load_image(i) for i in range(len(gallery))]
    with (
        SearchEngine.open(ensemble_index) as torch_engine,  # TorchQueryEncoder on the manifest's checkpoint
        SearchEngine.open(ensemble_index, ensemble_onnx) as onnx_engine,
    ):
        assert torch_engine.count == len(gallery)
        assert torch_engine.index_dir.manifest.dim == sum(MEMBER_DIMS)
        by_torch = torch_engine.search(images, k=3)
        by_onnx = onnx_engine.search(images, k=3)
    for i, (hits, onnx_hits) in enumerate(zip(by_torch, by_onnx, strict=True)):
        assert hits[0].id == i and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert onnx_hits.ids[0] == i
        np.testing.assert_allclose(onnx_hits.scores, hits.scores, atol=1e-4)


def test_a_real_server_answers_searches_on_an_ensemble_index_with_its_onnx_query_encoder(
    ensemble_index, ensemble_onnx, serving_gallery
):
    import httpx

    from serving.api.server import running_server
    from serving.app import create_app
    from serving.settings import ServeSettings

    gallery = CsvImageDataset(serving_gallery)
    settings = ServeSettings(index=ensemble_index, query_encoder=ensemble_onnx, default_k=3)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/index").json()["dim"] == sum(MEMBER_DIMS)
        for i in (0, 3):
            png = Path(gallery.paths[i]).read_bytes()
            response = client.post("/v1/search", files={"image": (f"q{i}.png", png, "image/png")})
            assert response.status_code == 200, response.text
            hits = response.json()["hits"]
            assert hits[0]["id"] == i and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
