"""``retrieval serve`` end to end: flags and ``RETRIEVAL_*`` variables reach the running server."""

from __future__ import annotations

import os

import httpx

from serving.api.server import serve_process

ORIGIN = "https://shop.example"


def test_serve_flags_and_environment(serving_index, serving_onnx, serving_gallery, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("file-key\n")
    args = [
        "--index", str(serving_index), "--query-encoder", str(serving_onnx),
        "--api-key-file", str(key_file), "--cors-origin", ORIGIN, "--batch-max-size", "1", "--max-k", "7",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RETRIEVAL_DEFAULT_K": "2",
        "RETRIEVAL_MAX_K": "50",
        "RETRIEVAL_PROVIDERS": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    with serve_process(args, env=env, ready_timeout_s=90) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/index").status_code == 401
        info = client.get("/v1/index", headers={"X-API-Key": "file-key"})
        assert info.status_code == 200 and info.json()["count"] == 9
        spec = client.get("/openapi.json").json()
        form = spec["components"]["schemas"]
        k_max = [
            s["properties"]["k"]["anyOf"][0]["maximum"] for s in form.values() if "image" in s.get("properties", {})
        ]
        assert k_max == [7]  # the flag beat RETRIEVAL_MAX_K=50
        image = serving_gallery.parent / "img_0.png"
        hits = client.post(
            "/v1/search", files={"image": ("q.png", image.read_bytes())}, headers={"X-API-Key": "file-key"}
        ).json()["hits"]
        assert len(hits) == 2  # RETRIEVAL_DEFAULT_K applied where no flag was given
        cors = client.get("/v1/healthz", headers={"Origin": ORIGIN})
        assert cors.headers["access-control-allow-origin"] == ORIGIN


def test_serve_refuses_bad_settings_with_one_line(serving_index, serving_onnx, tmp_path):
    from typer.testing import CliRunner

    from retrieval.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--index", str(serving_index), "--api-key-file", str(tmp_path / "none")])
    assert result.exit_code == 2 and "cannot read api_key_file" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["serve", "--index", str(serving_index), "--batch-max-size", "0"])
    assert result.exit_code == 2 and "batch_max_size" in result.output
    result = runner.invoke(app, ["serve", "--index", str(serving_index), "--provider", "cpu"])
    assert result.exit_code == 2 and "runtime 'torch' takes no option providers" in result.output
    onnx = ["serve", "--index", str(serving_index), "--query-encoder", str(serving_onnx)]
    result = runner.invoke(app, [*onnx, "--provider", "nosuch"])
    assert result.exit_code == 2 and "nosuch" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["serve"], env={"RETRIEVAL_INDEX": None})  # no --index and none in the environment
    assert result.exit_code == 2 and "invalid server settings" in result.output and "index" in result.output
