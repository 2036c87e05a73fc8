"""The on-device path end to end: the reference client embeds with a mobile model and searches a real server.

The client (``examples/query_client.py``) runs as its own process with only onnxruntime, Pillow and numpy;
the server is the real app under uvicorn on 127.0.0.1. The student's mobile model is exported from a tiny
"student" whose teacher built the index, so the server (which embeds uploads with the teacher) accepts its
vectors by the declared teacher id, and a model of another space is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "query_client.py"
K = 4


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 seeded photos of varied sizes: calibration and agreement images for the mobile export."""
    root = tmp_path_factory.mktemp("client_photos")
    rng = np.random.default_rng(5)
    for i in range(30):
        height, width = rng.integers(36, 80, 2)
        pixels = np.empty((height, width, 3))
        pixels[:] = rng.integers(0, 256, 3)
        pixels[: height // 2, : width // 3] = rng.integers(0, 256, 3)
        pixels += rng.normal(0, 15, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"photo_{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def student_mobile(make_student, tiny_checkpoint, photos, tmp_path_factory) -> Path:
    from serving.export_mobile import export_onnx_mobile

    student = make_student(tiny_checkpoint, seed=21)
    out = tmp_path_factory.mktemp("student_mobile") / "student.onnx"
    exported = export_onnx_mobile(student, out, photos, calibration_count=15, agreement_count=15, latency_repeats=3)
    return exported.ort_path


@pytest.fixture(scope="module")
def server(serving_index) -> Iterator[str]:
    with running_server(create_app(ServeSettings(index=serving_index))) as url:
        yield url


def _run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_client_embeds_on_device_and_gets_the_servers_ranking(student_mobile, server, serving_index, serving_gallery):
    from serving.engine import SearchEngine
    from serving.runtimes import open_query_encoder

    query = serving_gallery.parent / "img_4.png"
    done = _run_client("--model", str(student_mobile), "--server", server, "--k", str(K), "--json", str(query))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[0])
    assert answer["query"] == str(query) and len(answer["hits"]) == K

    # the same model run by the engine's own runtime, searched in-process, ranks the gallery the same way
    student = open_query_encoder(student_mobile)
    with Image.open(query) as image:
        vector = student.encode([image])
    assert answer["query_encoder_id"] == student.encoder_id
    with SearchEngine.open(serving_index) as engine:
        (expected,) = engine.search_embeddings(vector, K)
    assert [hit["id"] for hit in answer["hits"]] == expected.ids
    assert np.allclose([hit["score"] for hit in answer["hits"]], expected.scores, atol=1e-5)


def test_client_with_a_model_of_another_space_is_refused(other_checkpoint, server, serving_gallery, tmp_path):
    from serving.export import export_onnx

    foreign = export_onnx(other_checkpoint, tmp_path / "other.onnx").path  # a float export: the client takes both
    done = _run_client("--model", str(foreign), "--server", server, str(serving_gallery.parent / "img_0.png"))
    assert done.returncode == 1
    assert "409" in done.stderr and "does not share" in done.stderr


def test_client_reports_an_unreadable_photo_and_goes_on(student_mobile, server, serving_gallery, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = serving_gallery.parent / "img_1.png"
    done = _run_client("--model", str(student_mobile), "--server", server, "--json", str(broken), str(good))
    assert done.returncode == 1 and str(broken) in done.stderr
    assert [json.loads(line)["query"] for line in done.stdout.splitlines()] == [str(good)]
