"""Corrupt model files on the command line: `retrieval search` and `retrieval serve` refuse them in one line.

Real processes on real damaged files (100 flipped bytes in an ONNX export, 2,000 in a checkpoint's
weights, each also truncated): exit status 2, one ``error:`` line naming the file, no traceback, and
``serve`` never starts listening. Before the checksums, the flipped weights searched "fine" with wrong
scores and the server reported healthy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from file_damage import flip_bytes, truncate
from PIL import Image

RETRIEVAL = [sys.executable, "-m", "retrieval.cli.main"]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """An index of six images built by the tiny checkpoint, its ONNX export, and a damaged copy of each kind."""
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery
    from serving.export import export_onnx

    root = tmp_path_factory.mktemp("corrupt_models")
    gallery = root / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(gallery / f"img_{i}.png")
    (gallery / "list.csv").write_text("path\n" + "".join(f"img_{i}.png\n" for i in range(6)))
    build_index(tiny_checkpoint, open_gallery(gallery / "list.csv"), root / "index", batch_size=4, progress=False)
    exported = export_onnx(tiny_checkpoint, root / "encoder.onnx").path
    paths = {"index": root / "index", "query": gallery / "img_0.png"}
    for name, damage in (("onnx-flip100", lambda p: flip_bytes(p, 100, 1)), ("onnx-truncated", truncate)):
        paths[name] = Path(shutil.copy(exported, root / f"{name}.onnx"))
        damage(paths[name])
    for name, damage in (("weights-flip2000", lambda p: flip_bytes(p, 2000, 1)), ("weights-truncated", truncate)):
        paths[name] = Path(shutil.copytree(tiny_checkpoint, root / name))
        damage(paths[name] / "model.safetensors")
    return paths


def _damaged_file(paths: dict[str, Path], kind: str) -> Path:
    return paths[kind] / "model.safetensors" if kind.startswith("weights") else paths[kind]


def _check_refusal(result: subprocess.CompletedProcess, damaged: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(damaged) in lines[0], result.stderr


KINDS = ["onnx-flip100", "onnx-truncated", "weights-flip2000", "weights-truncated"]


@pytest.mark.parametrize("kind", KINDS)
def test_search_refuses_a_damaged_model_in_one_line(setup, kind):
    command = [*RETRIEVAL, "search", str(setup["query"]), "--index", str(setup["index"])]
    result = subprocess.run(
        [*command, "--query-encoder", str(setup[kind])], capture_output=True, text=True, timeout=120
    )
    _check_refusal(result, _damaged_file(setup, kind))
    assert result.stdout == ""  # no hits printed


@pytest.mark.parametrize(
    "kind",  # truncated files fail the same way in `serve` as in `search` (tested above): slow only
    [kind if "flip" in kind else pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS],
)
def test_serve_refuses_to_start_on_a_damaged_model(setup, kind):
    """The engine opens before uvicorn binds: a damaged model stops start-up, so no server reports healthy."""
    command = [*RETRIEVAL, "serve", "--index", str(setup["index"]), "--port", "0", "--no-warmup"]
    result = subprocess.run(
        [*command, "--query-encoder", str(setup[kind])], capture_output=True, text=True, timeout=120
    )
    _check_refusal(result, _damaged_file(setup, kind))
