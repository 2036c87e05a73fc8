"""Corrupt index files (truncated or bit-flipped index, manifest, metadata database) through the CLI.

Each corruption is made on a real index built by a real encoder, and must give one ``error:`` line naming
the file, exit status 2 and no traceback from ``index info``, ``search`` and ``serve`` start-up: never a
silent wrong answer. ``index verify`` adds checksums to an old-format manifest, after which a flipped
byte is caught by them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from file_damage import truncate
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def built_index(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """A 12-image exact index built by the tiny checkpoint, and one query image."""
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery

    gallery = tmp_path_factory.mktemp("corrupt_gallery")
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(gallery / f"g{i:02d}.png")
    out = tmp_path_factory.mktemp("corrupt_index") / "index"
    build_index(tiny_checkpoint, open_gallery(gallery), out, batch_size=4, progress=False)
    return out, gallery / "g03.png"


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(source, target)
    return target


def _drop_checksums(index: Path) -> None:
    """Turn the manifest into the older format, written before checksums existed."""
    manifest = json.loads((index / "manifest.json").read_text())
    manifest.pop("index_sha256")
    manifest.pop("metadata_sha256")
    (index / "manifest.json").write_text(json.dumps(manifest))


def _flip_vector(index: Path) -> None:
    """Double one stored vector in index.faiss (its float32 bytes found and rewritten in place)."""
    from indexing.faiss_index import FaissIndex

    vectors = FaissIndex.load(index / "index.faiss").reconstruct_all()[1]
    data = bytearray((index / "index.faiss").read_bytes())
    offset = data.find(vectors[4].tobytes())
    assert offset > 0
    data[offset : offset + vectors.shape[1] * 4] = (vectors[4] * 2).astype(np.float32).tobytes()
    (index / "index.faiss").write_bytes(bytes(data))


def _flip_byte(path: Path, position: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_manifest_checksum(index: Path) -> None:
    text = (index / "manifest.json").read_text()
    digest = json.loads(text)["index_sha256"]
    (index / "manifest.json").write_text(text.replace(digest, digest[:10] + chr(ord(digest[10]) ^ 0x01) + digest[11:]))


CORRUPTIONS = {
    "index truncated": ("index.faiss", lambda p: truncate(p / "index.faiss")),
    "index bit-flipped": ("index.faiss", lambda p: _flip_byte(p / "index.faiss", 0.6)),
    "manifest truncated": ("manifest.json", lambda p: truncate(p / "manifest.json")),
    "manifest bit-flipped": ("index.faiss", _flip_manifest_checksum),  # the two no longer agree: names the index
    "metadata truncated": ("metadata.sqlite", lambda p: truncate(p / "metadata.sqlite")),
    "metadata bit-flipped": ("metadata.sqlite", lambda p: _flip_byte(p / "metadata.sqlite", 0.9)),
}
OLD_FORMAT_CORRUPTIONS = {
    "old manifest, index vector changed": ("index.faiss", _flip_vector),
    "old manifest, index truncated": ("index.faiss", lambda p: truncate(p / "index.faiss")),
    "old manifest, metadata truncated": ("metadata.sqlite", lambda p: truncate(p / "metadata.sqlite")),
}


def _assert_one_line_error(result_code: int, output: str, name: str) -> None:
    assert result_code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert lines and lines[-1].startswith("error: ") and name in lines[-1], output


def _cli(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("kind", [*CORRUPTIONS, *OLD_FORMAT_CORRUPTIONS])
def test_corrupt_file_is_one_line_error_in_info_and_search(built_index, tmp_path, kind):
    source, query = built_index
    index = _copy(source, tmp_path)
    if kind in OLD_FORMAT_CORRUPTIONS:
        _drop_checksums(index)
    name, corrupt = {**CORRUPTIONS, **OLD_FORMAT_CORRUPTIONS}[kind]
    corrupt(index)
    for args in (["index", "info", str(index)], ["search", str(query), "--index", str(index)]):
        code, output = _cli(args)
        _assert_one_line_error(code, output, name)


def test_old_format_index_is_checked_then_verify_records_checksums(built_index, tmp_path):
    source, query = built_index
    index = _copy(source, tmp_path)
    _drop_checksums(index)
    code, output = _cli(["search", str(query), "--index", str(index), "--json"])
    assert code == 0, output  # a sound old-format index still opens
    code, output = _cli(["index", "verify", str(index)])
    assert code == 0 and "checksums recorded" in output, output
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["index_sha256"] and manifest["metadata_sha256"]
    code, output = _cli(["index", "info", str(index), "--verify"])
    assert code == 0 and "verified" in output, output
    _flip_byte(index / "metadata.sqlite", 0.95)  # a byte no structural check could see: now the checksum does
    code, output = _cli(["index", "info", str(index)])
    _assert_one_line_error(code, output, "metadata.sqlite")


def test_verify_refuses_a_changed_vector_the_open_sample_may_miss(built_index, tmp_path):
    source, _ = built_index
    index = _copy(source, tmp_path)
    _drop_checksums(index)
    _flip_vector(index)
    code, output = _cli(["index", "verify", str(index)])
    _assert_one_line_error(code, output, "index.faiss")
    assert "norm 2" in output
    assert "index_sha256" not in json.loads((index / "manifest.json").read_text())  # nothing recorded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "kind",
    [
        "index bit-flipped",
        "metadata truncated",
        pytest.param("manifest truncated", marks=pytest.mark.slow),
        pytest.param("index truncated", marks=pytest.mark.slow),
        pytest.param("metadata bit-flipped", marks=pytest.mark.slow),
        pytest.param("manifest bit-flipped", marks=pytest.mark.slow),
    ],
)
def test_serve_refuses_to_start_on_a_corrupt_index(built_index, tmp_path, kind):
    source, _ = built_index
    index = _copy(source, tmp_path)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(index)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "retrieval.cli.main", "serve", "--index", str(index), "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,  # a server that starts on a corrupt index would hang here: fail, do not wait forever
        env=env,
        cwd=ROOT,
    )
    _assert_one_line_error(done.returncode, done.stdout + done.stderr, name)
