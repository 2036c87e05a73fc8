"""Crash-safe writes: build the new content beside the target, then swap it in.

Checkpoints and index directories are written through ``atomic_directory``, single files (manifests,
embedding chunks, feature caches) through ``atomic_file``, so that a
crash or kill at any moment leaves either the complete previous version or the
complete new one on disk, never a half-written mix.

Replacing a directory is one ``renameat2(RENAME_EXCHANGE)`` on Linux: the complete new directory and the
old one trade places in a single atomic step, so there is a directory at the path at every instant (a
reader never finds the path missing, a kill never leaves it missing). Where the kernel, the C library or
the file system lacks the exchange, two renames are used (old aside as ``.<name>.old-<pid>-*``, new in
place) and ``recover_interrupted_swap`` renames the old version back if a kill lands between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_directory",
    "atomic_file",
    "fsync_directory",
    "fsync_tree",
    "recover_interrupted_swap",
    "remove_abandoned_temporaries",
    "write_file_atomically",
]

logger = logging.getLogger(__name__)

#: Seconds to sleep at the two points inside a directory swap (before the exchange, and between the exchange
#: and removing the old version). Zero in normal use; the crash-safety tests set it so that a SIGKILL lands
#: inside the swap deterministically instead of by luck.
SWAP_PAUSE_ENV = "RETRIEVAL_SWAP_PAUSE_S"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


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
    """Delete what ``atomic_directory`` writers to ``target`` that no longer run left beside it.

    That is their temporary directories (``.<target>.tmp-<pid>-*``: a half-written new version, or an old
    version exchanged out but not yet removed) and, once ``target`` exists again, old versions set aside by
    the two-rename fallback (``.<target>.old-*``), which are superseded by then. Directories of a live
    writer, and temporaries from before pids were recorded, are left alone. Returns what was removed.
    """
    removed = []
    for kind in ("tmp", "old"):
        if kind == "old" and not (target.exists() or target.is_symlink()):
            continue  # the old version may be the only copy left: recover_interrupted_swap restores it
        for candidate in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = _writer_pid(candidate, target, kind)
            legacy_old = kind == "old" and pid is None
            if candidate.is_dir() and (legacy_old or (pid is not None and not _process_alive(pid))):
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


def recover_interrupted_swap(target: str | Path) -> Path | None:
    """If ``target`` is missing because a writer was killed between the two renames of a swap, restore it.

    Only the two-rename fallback of ``atomic_directory`` can leave that state (the Linux exchange cannot):
    the previous version sits at ``.<target>.old-<pid>-*`` and nothing is at ``target``. When that writer
    is gone, the old version is renamed back. Returns the restored path, or ``None`` when there was nothing
    to restore or the rename was not possible (read-only folder, a live writer, a race with another writer).
    """
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    candidates = []
    for candidate in target.parent.glob(f".{target.name}.old-*"):
        pid = _writer_pid(candidate, target, "old")
        if candidate.is_dir() and (pid is None or not _process_alive(pid)):
            candidates.append(candidate)
    for candidate in sorted(candidates, key=lambda c: c.stat().st_mtime, reverse=True):
        try:
            os.rename(candidate, target)  # fails if a writer put a new version there meanwhile
        except OSError:
            continue
        fsync_directory(target.parent)
        logger.warning("restored %s from %s, left aside by an interrupted write", target, candidate.name)
        return target
    return None


def _writer_pid(candidate: Path, target: Path, kind: str) -> int | None:
    """The writer's pid recorded in ``.<target>.<kind>-<pid>-<random>``, or ``None`` for older names."""
    pid = candidate.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0]
    return int(pid) if pid.isdigit() and "-" in candidate.name[len(f".{target.name}.{kind}-") :] else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (Linux), or ``None`` where the C library has none (musl before 1.2.5, macOS)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the platform or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _pause_inside_swap() -> None:
    """Sleep ``$RETRIEVAL_SWAP_PAUSE_S`` seconds (crash-safety tests aim their SIGKILL here); no-op by default."""
    seconds = float(os.environ.get(SWAP_PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at the existing ``target`` so that ``target`` never goes missing."""
    if _exchange(tmp, target):  # tmp now holds the old version, under the writer's pid
        fsync_directory(target.parent)
        _pause_inside_swap()
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    _pause_inside_swap()  # the one window with nothing at target: recover_interrupted_swap closes it
    os.replace(tmp, target)
    fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``target`` atomically.

    If the body raises, the temporary directory is removed and ``target`` is untouched. On Linux an
    existing ``target`` is exchanged with the new directory in one step, so the path holds the old or the
    new version at every instant; elsewhere the two-rename fallback is used (see the module docstring).

    The temporary directory's name carries the writer's process id, so a later write to the same
    target removes the leftovers of writers that were killed (a large index would otherwise leave
    gigabytes behind on every kill), after restoring an old version that such a kill left aside.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    remove_abandoned_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700; the result should be shared like a mkdir
    try:
        yield tmp
        fsync_tree(tmp)
        _pause_inside_swap()
        if target.exists():
            _swap_in(tmp, target)
        else:
            os.replace(tmp, target)
            fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
