"""``retrieval serve`` end to end: flags and ``RETRIEVAL_*`` variables reach the running server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ORIGIN = "https://shop.example"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_flags_and_environment(serving_index, serving_onnx, serving_gallery, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("file-key\n")
    port = _free_port()
    command = [
        sys.executable, "-c", "from retrieval.cli.main import main; main()", "serve",
        "--index", str(serving_index), "--query-encoder", str(serving_onnx), "--port", str(port),
        "--api-key-file", str(key_file), "--cors-origin", ORIGIN, "--batch-max-size", "1", "--max-k", "7",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RETRIEVAL_DEFAULT_K": "2",
        "RETRIEVAL_MAX_K": "50",
        "RETRIEVAL_PROVIDERS": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"retrieval serve exited: {process.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("retrieval serve did not become ready")
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as client:
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
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
