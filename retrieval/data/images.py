"""Image decoding with errors that name the file, and a skip-and-report mode for bulk jobs."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from retrieval.errors import UserFacingError

__all__ = ["CorruptImageError", "SkipReport", "decode_image_bytes", "load_image"]


class CorruptImageError(UserFacingError, ValueError):
    """An image that cannot be read or decoded; the message names the file and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def _decode(fp: io.BytesIO | Path, source: str) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()  # force full decode so truncated files fail here, not later in a worker
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise CorruptImageError(source, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(source, str(exc) or type(exc).__name__) from None


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image.

    Raises:
        CorruptImageError: missing, empty, truncated or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptImageError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise CorruptImageError(str(path), "empty file")
    return _decode(path, str(path))


def decode_image_bytes(data: bytes, source: str = "<upload>") -> Image.Image:
    """Decode in-memory bytes (an HTTP upload) as an RGB image, with the same errors as ``load_image``."""
    if not data:
        raise CorruptImageError(source, "empty file")
    return _decode(io.BytesIO(data), source)


@dataclass
class SkipReport:
    """Files a bulk job skipped, with the reason, so a run can finish and still say what it left out."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, error: CorruptImageError) -> None:
        self.skipped.append((error.source, error.reason))

    def __len__(self) -> int:
        return len(self.skipped)

    @classmethod
    def read(cls, path: str | Path) -> SkipReport:
        """Read a report written by :meth:`write` (one ``path<TAB>reason`` line per file after the header)."""
        lines = Path(path).read_text().splitlines()[1:]
        return cls([tuple(line.split("\t", 1)) if "\t" in line else (line, "") for line in lines if line])

    def write(self, path: str | Path) -> None:
        lines = ["path\treason", *(f"{src}\t{reason}" for src, reason in self.skipped)]
        Path(path).write_text("\n".join(lines) + "\n")
