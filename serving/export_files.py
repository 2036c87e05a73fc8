"""Atomic writes for exported models: stage beside the target, verify, then rename into place.

An export is only worth keeping once it has been checked, and a check can fail after minutes of work.
Writing to a temporary file in the target's folder and renaming it over the target (``os.replace`` is
atomic within one file system) means a failed, interrupted or unverified export never leaves a
half-written or wrong model at the path a server or a phone app reads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["publish", "staged_file"]


@contextlib.contextmanager
def staged_file(out_path: str | Path, suffix: str) -> Iterator[Path]:
    """A fresh temporary path beside ``out_path`` (its parent folders created), removed on exit if still there.

    Args:
        out_path: the final file the staged one will replace.
        suffix: the temporary file's suffix (tools such as ONNX Runtime look at it: ``.onnx``, ``.ort``).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.tmp-", suffix=suffix, dir=out_path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def publish(tmp: Path, out_path: str | Path) -> Path:
    """Rename ``tmp`` over ``out_path`` after making it readable by all and flushing it to disk.

    ``mkstemp`` creates owner-only files; an exported model is meant to be shared.
    """
    os.chmod(tmp, 0o644)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out_path)
    return Path(out_path)
