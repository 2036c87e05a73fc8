"""atomic_directory: all or nothing, and the result is readable like an ordinary directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from retrieval.atomic import atomic_directory


def test_success_replaces_and_failure_keeps_the_previous_version(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind


def test_result_has_the_permissions_of_a_plain_mkdir(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_a_later_write_removes_what_killed_writers_left_behind(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited: its pid is (almost surely) free now
    abandoned = tmp_path / f".out.tmp-{dead_pid}-abc"
    abandoned.mkdir()
    (abandoned / "index.faiss").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"  # this very process: still writing, must be kept
    live.mkdir()
    legacy = tmp_path / ".out.tmp-k2j3h4"  # no pid recorded: cannot tell, kept
    legacy.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert not abandoned.exists() and live.is_dir() and legacy.is_dir()
    assert (target / "a.txt").read_text() == "two"
