"""Searching with an exported ONNX model never imports torch: from the CLI, from ``SearchEngine``, while probing.

Each check runs in a fresh interpreter (this test process has torch loaded already) and reports which
modules were imported. The CLI check runs the real ``retrieval`` entry module under ``python -X importtime``,
which logs every module the process imports, whenever it does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Heavy modules the ONNX path must not load (timm and torchvision import torch, so either would mean torch).
FORBIDDEN = ("torch", "torchvision", "timm")

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from serving.engine import SearchEngine
    from serving.runtimes import runtime_for

    index, onnx, checkpoint, *images = sys.argv[1:]
    probed = runtime_for(checkpoint)  # the torch probe looks at file names only
    with SearchEngine.open(index, onnx, threads=1) as engine:
        results = engine.search([Image.open(path) for path in images], k=3)
        above, _ = engine.search_above([Image.open(images[0])], 0.5)
    print(json.dumps({
        "probed": probed,
        "runtime": type(engine.query_encoder).__name__,
        "first": [r.to_dict()["hits"][0]["id"] for r in results],
        "above": len(above[0].to_dict()["hits"]),
        "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "timm"}),
    }))
    """
)


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _gallery_images(serving_gallery: Path, *numbers: int) -> list[str]:
    return [str(Path(serving_gallery).parent / f"img_{i}.png") for i in numbers]


def test_cli_search_with_onnx_never_imports_torch(serving_index, serving_onnx, serving_gallery):
    images = _gallery_images(serving_gallery, 4, 2)
    args = ["search", "--index", str(serving_index), "--query-encoder", str(serving_onnx), *images, "--k", "3"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "retrieval.cli.main", *args, "--json", "--provider", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)
    assert [item["hits"][0]["id"] for item in payload["results"]] == [4, 2]  # each image finds itself
    assert payload["errors"] == []
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, flags=re.MULTILINE)
    assert "onnxruntime" in imported and "faiss" in imported  # the log is read correctly
    heavy = sorted({name for name in imported if name.split(".")[0] in FORBIDDEN})
    assert heavy == [], f"the ONNX search path imported {heavy[:5]}"


def test_search_engine_with_onnx_never_imports_torch(serving_index, serving_onnx, serving_gallery, tiny_checkpoint):
    images = _gallery_images(serving_gallery, 0, 5, 7)
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, str(serving_index), str(serving_onnx), str(tiny_checkpoint), *images],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["probed"] == "torch"
    assert report["runtime"] == "OnnxRuntimeQueryEncoder"
    assert report["first"] == [0, 5, 7] and report["above"] >= 1
    assert report["loaded"] == [], f"torch-side modules were imported: {report['loaded']}"


def test_cli_reports_a_missing_provider(serving_index, serving_onnx, serving_gallery):
    """``--provider`` reaches ONNX Runtime: asking for one that is not installed is a clear error (exit 2)."""
    import onnxruntime as ort
    from typer.testing import CliRunner

    from retrieval.cli.main import app

    if "CUDAExecutionProvider" in ort.get_available_providers():
        import pytest

        pytest.skip("CUDA is installed here: nothing is missing")
    images = _gallery_images(serving_gallery, 1)
    args = ["search", "--index", str(serving_index), "--query-encoder", str(serving_onnx), *images, "--json"]
    result = CliRunner().invoke(app, [*args, "--provider", "cuda"])
    assert result.exit_code == 2
    assert "none of the requested ONNX Runtime execution providers is installed (CUDAExecutionProvider)" in (
        result.output
    )
    forced = CliRunner().invoke(app, [*args, "--runtime", "tensorrt"])
    assert forced.exit_code == 2 and "has no sidecar" in forced.output
