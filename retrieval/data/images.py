"""Image decoding with errors that name the file, and a skip-and-report mode for bulk jobs.

Uploads (``decode_image_bytes``) may also be bounded in pixels: a 164 KB PNG can declare 13000 x 13000
pixels, which passes Pillow's own bomb guard (it fires above 2 x 89.5 MP) and decodes to 169 MB of grey
plus 507 MB of RGB. The size is read from the file header (``Image.open`` is lazy), so such a file is
refused before a single pixel is decoded. Large JPEGs are decoded at a reduced scale with ``draft``,
see ``DRAFT_MIN_PIXELS``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from retrieval.errors import UserFacingError

__all__ = [
    "DEFAULT_MAX_UPLOAD_PIXELS",
    "DRAFT_MIN_PIXELS",
    "DRAFT_SIDE_FACTOR",
    "CorruptImageError",
    "ImageTooLargeError",
    "SkipReport",
    "decode_image_bytes",
    "load_image",
]

#: Default pixel limit of a search upload: 50 MP holds the largest photos cameras commonly write (full-resolution
#: 48/50 MP phone modes, 8160 x 6120; 45.7 MP full-frame bodies) while a query is shrunk to a few hundred pixels
#: a side anyway. A 50 MP upload decodes to at most 150 MB of RGB (a JPEG far less, see ``DRAFT_MIN_PIXELS``).
DEFAULT_MAX_UPLOAD_PIXELS = 50_000_000
#: JPEGs above this many pixels are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``).
#: The threshold sits above the 12 MP every common phone camera writes by default, so ordinary queries decode
#: exactly as the gallery was decoded at indexing time (full decodes); draft pixels differ slightly from a full
#: decode followed by a resize, which only the rare very large query accepts in exchange for 4-64x less memory.
DRAFT_MIN_PIXELS = 16_000_000
#: A drafted JPEG keeps a shorter side of at least this many times the model's input side, so the resize to the
#: model input still averages several source pixels per output pixel (the search result stays the same).
DRAFT_SIDE_FACTOR = 4


class CorruptImageError(UserFacingError, ValueError):
    """An image that cannot be read or decoded; the message names the file and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


class ImageTooLargeError(UserFacingError, ValueError):
    """An image whose header declares more pixels than the limit; refused before decoding (HTTP 413)."""

    def __init__(self, source: str, size: tuple[int, int], limit: int) -> None:
        width, height = size
        super().__init__(
            f"image {source} is too large: {width}x{height} is {width * height / 1e6:.1f} megapixels; "
            f"the limit is {limit / 1e6:g} megapixels"
        )
        self.source = source
        self.size = size
        self.limit = limit


def _bounded(img: Image.Image, source: str, max_pixels: int | None, target_size: int | None) -> None:
    """Refuse ``img`` above ``max_pixels`` (header size), and draft a large JPEG down towards ``target_size``."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(source, (width, height), max_pixels)
    if target_size is not None and img.format == "JPEG" and width * height > DRAFT_MIN_PIXELS:
        keep = int(target_size) * DRAFT_SIDE_FACTOR
        img.draft(img.mode, (keep, keep))  # keeps both sides >= keep: a scale of 1/2, 1/4 or 1/8, or none


def _decode(
    fp: io.BytesIO | Path, source: str, max_pixels: int | None = None, target_size: int | None = None
) -> Image.Image:
    try:
        with Image.open(fp) as img:
            _bounded(img, source, max_pixels, target_size)
            img.load()  # force full decode so truncated files fail here, not later in a worker
            return img.convert("RGB")
    except ImageTooLargeError:
        raise
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


def decode_image_bytes(
    data: bytes, source: str = "<upload>", *, max_pixels: int | None = None, target_size: int | None = None
) -> Image.Image:
    """Decode in-memory bytes (an HTTP upload) as an RGB image, with the same errors as ``load_image``.

    Args:
        data: the file's bytes.
        source: the name to give in error messages (the client's file name, never a server path).
        max_pixels: refuse images whose header declares more pixels (``None``: only Pillow's bomb guard).
        target_size: the model's input side; a JPEG above ``DRAFT_MIN_PIXELS`` is then decoded at the smallest
            DCT scale keeping ``DRAFT_SIDE_FACTOR`` times it. ``None`` always decodes at full size.

    Raises:
        CorruptImageError: empty, truncated or non-image bytes.
        ImageTooLargeError: more pixels than ``max_pixels``.
    """
    if not data:
        raise CorruptImageError(source, "empty file")
    return _decode(io.BytesIO(data), source, max_pixels, target_size)


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
