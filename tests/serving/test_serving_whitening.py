"""A whitened index served: every runtime's query (torch, ONNX, a client's embedding) goes through its whitening."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from isolated_python import run_isolated

from indexing import open_index_dir
from retrieval.data.datasets import CsvImageDataset
from serving.app import create_app
from serving.engine import SearchEngine
from serving.runtimes import open_query_encoder
from serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def whitened_index(tiny_checkpoint, serving_gallery, tmp_path_factory) -> Path:
    """The serving gallery (3 colours x 3 images) indexed with learned whitening from its fine labels: 32 -> 8 dims."""
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery

    out = tmp_path_factory.mktemp("whitened_index") / "index"
    build_index(tiny_checkpoint, open_gallery(serving_gallery), out, batch_size=4, progress=False, whiten="learned")
    return out


@pytest.fixture(scope="module")
def gallery(serving_gallery) -> CsvImageDataset:
    return CsvImageDataset(serving_gallery)


def _by_hand(index_path: Path, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Whiten by hand and search the stored vectors exhaustively: ids and scores, best first."""
    with open_index_dir(index_path) as directory:
        ids, stored = directory.index.reconstruct_all()
        scores = directory.whitening.apply(raw) @ stored.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def test_torch_and_onnx_queries_hit_the_same_results_as_whitening_by_hand(
    whitened_index, serving_onnx, tiny_checkpoint, gallery
):
    images = [gallery.load_image(i) for i in (0, 4, 8)]
    with (
        SearchEngine.open(whitened_index) as torch_engine,
        SearchEngine.open(whitened_index, serving_onnx) as onnx_engine,
    ):
        assert (torch_engine.dim, torch_engine.index_dim) == (32, 8)
        a = torch_engine.search(images, k=5)
        b = onnx_engine.search(images, k=5)
        raw = torch_engine.embed(images)
    assert [r.ids for r in a] == [r.ids for r in b]
    np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], atol=1e-4)
    ids, scores = _by_hand(whitened_index, raw, 5)
    assert [list(r.ids) for r in a] == ids.tolist()
    np.testing.assert_allclose([r.scores for r in a], scores, atol=1e-5)
    assert [r.ids[0] for r in a] == [0, 4, 8]  # each gallery image still finds itself first


def test_the_embedding_endpoint_takes_encoder_vectors_and_reports_the_whitening(
    whitened_index, tiny_checkpoint, gallery
):
    settings = ServeSettings(index=whitened_index, default_k=4, max_k=9, batch_max_size=1)
    raw = open_query_encoder(tiny_checkpoint).encode([gallery.load_image(3)])
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/index").json()
        assert (info["dim"], info["index_dim"]) == (32, 8)
        assert info["whitening"]["method"] == "learned" and info["whitening"]["dim_in"] == 32
        assert info["whitening"]["dim_out"] == 8 and info["whitening"]["count"] == 9
        body = {"embedding": raw[0].tolist(), "encoder_id": info["encoder_id"], "k": 4}
        by_vector = client.post("/v1/search/embedding", json=body)
        assert by_vector.status_code == 200, by_vector.text
        png = Path(gallery.paths[3]).read_bytes()
        by_image = client.post("/v1/search", files={"image": ("q.png", png, "image/png")}, data={"k": "4"})
        assert by_image.status_code == 200, by_image.text
        whitened = client.post("/v1/search/embedding", json={**body, "embedding": [1.0] + [0.0] * 7})
    ids, scores = _by_hand(whitened_index, raw, 4)
    assert [hit["id"] for hit in by_vector.json()["hits"]] == ids[0].tolist()
    assert [hit["id"] for hit in by_image.json()["hits"]] == ids[0].tolist()
    np.testing.assert_allclose([hit["score"] for hit in by_vector.json()["hits"]], scores[0], atol=1e-5)
    assert whitened.status_code == 422 and "takes 32-d query vectors" in whitened.json()["detail"]


ONNX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from serving.engine import SearchEngine

    index, onnx, *images = sys.argv[1:]
    with SearchEngine.open(index, onnx, threads=1) as engine:
        results = engine.search([Image.open(path) for path in images], k=3)
        whitening = engine.index_dir.whitening.method
    print(json.dumps({
        "first": [r.to_dict()["hits"][0]["id"] for r in results],
        "whitening": whitening,
        "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "timm"}),
    }))
    """
)


def test_a_whitened_index_is_searched_with_onnx_without_torch(whitened_index, serving_onnx, serving_gallery):
    images = [str(Path(serving_gallery).parent / f"img_{i}.png") for i in (2, 6)]
    done = run_isolated(["-c", ONNX_SCRIPT, str(whitened_index), str(serving_onnx), *images])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"first": [2, 6], "whitening": "learned", "loaded": []}


def test_a_query_encoder_of_the_whitened_size_is_refused(whitened_index, tiny_encoder_config, tmp_path):
    from models import Encoder, save_encoder
    from serving.engine import EncoderMismatchError

    with open_index_dir(whitened_index) as directory:
        teacher_id = directory.manifest.encoder_id
    config = tiny_encoder_config.model_copy(update={"teacher_id": teacher_id, "embedding_dim": 8})
    save_encoder(Encoder(config), tmp_path / "student8")
    with pytest.raises(EncoderMismatchError, match=r"produces 8-d embeddings .* expects 32-d vectors from its encoder"):
        SearchEngine.open(whitened_index, tmp_path / "student8")
