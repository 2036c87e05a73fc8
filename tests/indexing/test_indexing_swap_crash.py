"""SIGKILL inside the directory swap of a real index write: an index is at the path at every instant.

The writer runs in a child process with ``RETRIEVAL_SWAP_PAUSE_S`` set, so it sleeps at the two points
inside the swap (before the exchange, and between the exchange and removing the old version) and the
kill lands there deterministically. Afterwards the path opens (checksums verified) as the old or the new
version, and the next write removes what the killed writer left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from indexing.faiss_index import FaissIndex
from indexing.index_dir import open_index_dir, write_index_dir
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow
from indexing.verify import verify_index_dir
from retrieval.atomic import SWAP_PAUSE_ENV

ROOT = Path(__file__).resolve().parents[2]
WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from indexing.faiss_index import FaissIndex
    from indexing.index_dir import write_index_dir
    from indexing.manifest import Manifest
    from indexing.metadata import MetadataRow

    path, n = sys.argv[1], int(sys.argv[2])
    vectors = np.eye(16, dtype=np.float32)[np.arange(n) % 16]
    index = FaissIndex(16, device="cpu")
    index.add(vectors, np.arange(n))
    rows = (MetadataRow(id=i, path=f"{i}.png") for i in range(n))
    write_index_dir(path, index, rows, Manifest(dim=16, count=n, encoder_id="e"))
    """
)


def _write(path: Path, n: int) -> None:
    index = FaissIndex(16, device="cpu")
    index.add(np.eye(16, dtype=np.float32)[np.arange(n) % 16], np.arange(n))
    write_index_dir(
        path, index, (MetadataRow(id=i, path=f"{i}.png") for i in range(n)), Manifest(dim=16, count=n, encoder_id="e")
    )


def _start_writer(path: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, SWAP_PAUSE_ENV: "3", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)], env=env, cwd=ROOT)


def _wait_for(condition, child: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, "the writer ended before reaching the swap"
        assert time.monotonic() < deadline, "the writer did not reach the swap in time"
        time.sleep(0.05)


def _count(path: Path) -> int | None:
    try:
        with open_index_dir(path) as directory:
            return len(directory)
    except Exception:
        return None


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def test_kill_before_the_exchange_leaves_the_old_index(tmp_path):
    path = tmp_path / "idx"
    _write(path, 4)
    child = _start_writer(path, 8)
    _wait_for(lambda: any((tmp / "manifest.json").is_file() for tmp in tmp_path.glob(".idx.tmp-*")), child)
    time.sleep(0.5)  # the manifest is written last, then fsync, then the pause: the kill lands in the pause
    _kill(child)
    assert _count(path) == 4
    assert verify_index_dir(path).checksums == "verified"
    _write(path, 6)  # the next write cleans the killed writer's half of the swap
    assert _count(path) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_kill_between_exchange_and_cleanup_leaves_the_new_index(tmp_path):
    path = tmp_path / "idx"
    _write(path, 4)
    child = _start_writer(path, 8)
    seen: list[int | None] = []

    def exchanged() -> bool:  # the path is never missing while we watch: old (4) until the exchange, then new (8)
        seen.append(_count(path))
        return seen[-1] == 8

    _wait_for(exchanged, child)
    _kill(child)
    assert set(seen) <= {4, 8}, seen
    assert _count(path) == 8
    assert verify_index_dir(path).checksums == "verified"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "idx"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".idx.tmp-{child.pid}-")  # the old version
    _write(path, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_readers_never_see_a_mix_of_two_versions_while_writers_swap(tmp_path):
    """Opening while another thread keeps replacing the index: every open sees one whole version, no error."""
    import threading

    path = tmp_path / "idx"
    _write(path, 4)
    stop = threading.Event()
    writes = []

    def keep_writing() -> None:
        while not stop.is_set():
            _write(path, 8 if len(writes) % 2 == 0 else 4)
            writes.append(1)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    seen = []
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with open_index_dir(path) as directory:  # raises on a torn read
                seen.append((len(directory), directory.manifest.count, directory.metadata.count()))
    finally:
        stop.set()
        writer.join()
    assert len(writes) >= 5 and len(seen) >= 20, (len(writes), len(seen))  # the race was really run
    assert {count for count, _, _ in seen} == {4, 8}
    assert all(a == b == c for a, b, c in seen)
