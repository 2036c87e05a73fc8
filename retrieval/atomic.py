"""Crash-safe writes: build the new content beside the target, then swap it in.

Checkpoints and index directories are written through ``atomic_directory``, single files (manifests,
embedding chunks, feature caches) through ``atomic_file``, so that a
crash or kill at any moment leaves either the complete previous version or the
complete new one on disk, never a half-written mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_directory",
    "atomic_file",
    "fsync_directory",
    "fsync_tree",
    "remove_abandoned_temporaries",
    "write_file_atomically",
]


def fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the directories themselves to stable storage."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_directory(Path(root))


def fsync_directory(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file handle whose content replaces ``path`` whole when the block ends without error.

    The handle writes to a temporary sibling (``.<name>.tmp-*``) that is fsynced, renamed over ``path`` and
    followed by an fsync of the folder; if the block raises, the temporary file is removed and ``path`` is
    untouched. A reader (or a crash) sees the previous file or the new one, never a torn one. Writers that
    stream (``np.save``, ``np.savez``) can write straight into the handle. The file gets the permissions of a
    plain ``open(path, "w")`` (``mkstemp`` alone would make it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_file_atomically(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def remove_abandoned_temporaries(target: Path) -> list[Path]:
    """Delete the temporary directories of ``atomic_directory`` writers to ``target`` that no longer run.

    Only directories named ``.<target>.tmp-<pid>-*`` whose process is gone on this machine are removed;
    a live writer's directory (or one from before pids were recorded) is left alone. Returns what was removed.
    """
    removed = []
    for candidate in target.parent.glob(f".{target.name}.tmp-*"):
        pid = candidate.name[len(f".{target.name}.tmp-") :].split("-", 1)[0]
        if candidate.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``target`` atomically.

    If the body raises, the temporary directory is removed and ``target`` is untouched.
    Replacing an existing directory takes two renames (old aside, new in place); a
    crash between them leaves the old version under ``<target>.old-*``, which
    a reader can restore by hand, but ``target`` itself is never
    half-written.

    The temporary directory's name carries the writer's process id, so a later write to the same
    target removes the leftovers of writers that were killed (a large index would otherwise leave
    gigabytes behind on every kill).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700; the result should be shared like a mkdir
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
