"""A SHA-256 that an exported model file carries inside itself, in its ``file_sha256`` metadata property.

Changed bytes in an ONNX model often still load: most of the file is weights, and ONNX Runtime checks
the protobuf's structure, not the values. The model then returns wrong or NaN embeddings, and a
server built on it starts, reports healthy and answers every search wrongly. A checksum verified when
the file is opened turns that into one error naming the file.

A file cannot hold the hash of its own bytes, so the hash is taken over the whole file with the 64
characters of the property's value set to ``PLACEHOLDER``: exporters write the property as
``PLACEHOLDER``, then ``seal_file`` hashes the file and writes the digest over those same 64 bytes
(same length, so nothing else moves). ``verify_file`` puts the placeholder back in a copy of the bytes
and hashes again. Every byte of the file is covered (a change inside the digest itself makes the digest
wrong), and the scheme does not depend on how a serialiser lays a model out, so the same code seals both
``.onnx`` (protobuf) and ``.ort`` (flatbuffers) files: ONNX Runtime keeps ``metadata_props`` in an
ORT-format copy, so the copy carries the float file's digest, which ``seal_file`` replaces with its own.

ORT-format files copied from an export by hand carry the ``.onnx``'s digest, which cannot tell a damaged
copy from an unsealed one; so an ``.ort`` is checked against a ``<file>.sha256`` sidecar instead
(``sha256sum`` format, so ``sha256sum -c`` checks it too), which the mobile export writes beside it.

This module imports neither onnx nor ONNX Runtime: the runtime reads the recorded value from its session.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from retrieval.atomic import write_file_atomically
from retrieval.errors import UserFacingError

__all__ = [
    "CHECKSUM_KEY",
    "PLACEHOLDER",
    "ModelChecksumError",
    "checksum_sidecar_path",
    "file_digest",
    "seal_file",
    "verify_file",
    "verify_sidecar",
    "write_checksum_sidecar",
]

logger = logging.getLogger(__name__)

#: The metadata property holding the digest.
CHECKSUM_KEY = "file_sha256"
#: What the property holds while the file is hashed (64 characters, like a hex SHA-256).
PLACEHOLDER = "=" * 64
_HEX_DIGITS = frozenset("0123456789abcdef")


class ModelChecksumError(UserFacingError, ValueError):
    """A model file whose bytes do not match the checksum it carries (corrupt or replaced); names the file."""


def file_digest(data: bytes, recorded: str) -> str:
    """SHA-256 (hex) of ``data`` with its one occurrence of ``recorded`` (the stored value) set to ``PLACEHOLDER``.

    Raises:
        ValueError: ``recorded`` does not occur exactly once in ``data``.
    """
    marker = recorded.encode("ascii")
    count = data.count(marker)
    if count != 1:
        raise ValueError(f"the checksum value occurs {count} times in the file, not once")
    return hashlib.sha256(data.replace(marker, PLACEHOLDER.encode("ascii"))).hexdigest()


def seal_file(path: str | Path, current: str = PLACEHOLDER) -> str:
    """Write the file's checksum over ``current`` (the property's present value, 64 characters); return it.

    Args:
        path: a model file whose ``CHECKSUM_KEY`` property holds ``current``.
        current: ``PLACEHOLDER`` for a freshly saved ``.onnx``; for an ORT-format copy, the digest of the
            ``.onnx`` it was converted from (the copy inherits the property).

    Raises:
        ValueError: ``current`` is not 64 characters or does not occur exactly once in the file.
    """
    path = Path(path)
    if len(current) != len(PLACEHOLDER):
        raise ValueError(f"a checksum value has {len(PLACEHOLDER)} characters, got {current!r}")
    data = path.read_bytes()
    digest = file_digest(data, current)
    path.write_bytes(data.replace(current.encode("ascii"), digest.encode("ascii")))
    return digest


def verify_file(path: str | Path, recorded: str | None) -> bool:
    """Check ``path`` against the digest it records; ``False`` (with a warning) for a file without one.

    Args:
        path: the model file.
        recorded: the value of its ``CHECKSUM_KEY`` property, ``None`` when absent (files exported before it).

    Raises:
        ModelChecksumError: the value is malformed, or the file's bytes do not hash to it.
    """
    path = Path(path)
    if recorded is None:
        logger.warning(
            "%s carries no %s (exported before checksums); its integrity cannot be checked: export it again",
            path,
            CHECKSUM_KEY,
        )
        return False
    if len(recorded) != len(PLACEHOLDER) or not set(recorded) <= _HEX_DIGITS:
        raise ModelChecksumError(
            f"{path} is corrupt: its {CHECKSUM_KEY} metadata is not a SHA-256 ({recorded[:70]!r}); export it again"
        )
    try:
        actual = file_digest(path.read_bytes(), recorded)
    except ValueError:
        actual = None
    except OSError as exc:
        raise ModelChecksumError(f"cannot read {path} to check it: {exc}") from exc
    if actual != recorded:
        raise ModelChecksumError(
            f"{path} does not match the checksum recorded in its metadata ({CHECKSUM_KEY}): the file is corrupt or "
            "was replaced; export or copy it again"
        )
    return True


def checksum_sidecar_path(path: str | Path) -> Path:
    """Where the checksum sidecar of ``path`` lives: the same name with ``.sha256`` appended."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checksum_sidecar(path: str | Path, name: str | None = None) -> Path:
    """Write ``<path>.sha256`` (``<hex>  <name>``, as ``sha256sum`` prints it) atomically; return its path.

    Args:
        path: the file to hash.
        name: the file name the line gives (default ``path``'s); pass the final name when ``path`` is a
            staged temporary file.
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = checksum_sidecar_path(path.with_name(name) if name else path)
    write_file_atomically(sidecar, f"{digest}  {name or path.name}\n")
    return sidecar


def verify_sidecar(path: str | Path) -> bool:
    """Check ``path`` against ``<path>.sha256``; ``False`` (with a warning) when there is no sidecar.

    Raises:
        ModelChecksumError: the sidecar is malformed, or the file's SHA-256 differs from it.
    """
    path = Path(path)
    sidecar = checksum_sidecar_path(path)
    if not sidecar.is_file():
        logger.warning("%s has no checksum sidecar %s; its integrity cannot be checked", path, sidecar.name)
        return False
    try:
        recorded = sidecar.read_text(encoding="ascii").split()[0] if sidecar.stat().st_size < 4096 else ""
    except (OSError, UnicodeDecodeError, IndexError):
        recorded = ""
    if len(recorded) != len(PLACEHOLDER) or not set(recorded) <= _HEX_DIGITS:
        raise ModelChecksumError(f"checksum sidecar {sidecar} is not a SHA-256 line; export the model again")
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelChecksumError(f"cannot read {path} to check it: {exc}") from exc
    if actual != recorded:
        raise ModelChecksumError(
            f"{path} does not match the checksum in {sidecar.name}: the file is corrupt or was replaced; export or "
            "copy it again"
        )
    return True
