"""JPEG thumbnails of indexed images, for the search page's result grid.

A hit names an item by id; the image behind it is the file whose path the index recorded at build
time (``MetadataStore``: absolute for galleries read from a folder, a CSV or a path list; a relative
path is taken relative to the index directory, as the manifest's ``encoder_path`` is). A request
therefore chooses only an id and a size: it can never name a file, so only files recorded in the
index are ever read. Items recorded without a file (in-memory datasets store display names) and
files that have gone missing are "not found", with a message that names the item, not the path.

Decoding a full-size photo for each card of a grid is the expensive part, so recent thumbnails are
kept in a small LRU cache keyed by the file's identity (path, size, modification time): a file
replaced on disk is never answered from a stale entry.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from indexing import IndexDirectory
from retrieval.errors import UserFacingError

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SIZE",
    "MIN_SIZE",
    "Thumbnail",
    "ThumbnailNotFoundError",
    "Thumbnailer",
    "make_thumbnail",
]

logger = logging.getLogger(__name__)

#: Bounds of the longest side of a thumbnail, in pixels: large enough for a retina grid card, small
#: enough that a request cannot make the server encode (and cache) full-size images.
MIN_SIZE = 16
MAX_SIZE = 512
DEFAULT_SIZE = 160
#: Source files larger than this are not decoded for a thumbnail (a gallery of photos stays far below).
MAX_SOURCE_BYTES = 64 * 1024 * 1024
JPEG_QUALITY = 85
#: White: transparent PNG/WebP areas turn white rather than black in a JPEG.
_BACKGROUND = (255, 255, 255)


class ThumbnailNotFoundError(UserFacingError, LookupError):
    """No thumbnail for an item: unknown id, no file recorded, file missing or unreadable (HTTP 404).

    The message names the item id only, never the server path, so the API can return it as it is.
    """


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG thumbnail and the tag a client may send back (``If-None-Match``) to revalidate it."""

    data: bytes
    etag: str
    width: int
    height: int


def make_thumbnail(path: Path, size: int) -> tuple[bytes, int, int]:
    """Decode ``path`` and return a JPEG whose longest side is at most ``size``, with its width and height.

    The image is turned upright by its EXIF orientation, transparent areas become white, and it is
    never enlarged (the page scales small images with CSS).

    Raises:
        ValueError: ``size`` out of [MIN_SIZE, MAX_SIZE].
        OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError: not a readable image.
    """
    _check_size(size)
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 1/2..1/8 while reading
        img = ImageOps.exif_transpose(img)
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        rgb = _flatten(img)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue(), rgb.width, rgb.height


def _flatten(img: Image.Image) -> Image.Image:
    """RGB with any alpha channel composited onto white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"thumbnail size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")


class Thumbnailer:
    """Thumbnails of the items of one opened index, with an LRU cache of recent ones. Safe from several threads.

    Args:
        index_dir: the opened index whose metadata records each item's image path.
        max_entries: most thumbnails kept in the cache.
        max_bytes: most JPEG bytes kept in the cache (the older ones go first).
    """

    def __init__(self, index_dir: IndexDirectory, max_entries: int = 512, max_bytes: int = 32 * 1024 * 1024) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must not be negative")
        self.index_dir = index_dir
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple, Thumbnail] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def thumbnail(self, item_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
        """The JPEG thumbnail of item ``item_id`` with its longest side at most ``size``.

        Raises:
            ValueError: ``size`` out of [MIN_SIZE, MAX_SIZE].
            ThumbnailNotFoundError: see the class.
        """
        _check_size(size)
        path = self.image_path(item_id)
        info = _regular_file_stat(path, item_id)
        key = (item_id, size, str(path), info.st_size, info.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        try:
            data, width, height = make_thumbnail(path, size)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            logger.warning("thumbnail of item %d: cannot decode %s: %s", item_id, path, exc)
            raise ThumbnailNotFoundError(f"no thumbnail for item {item_id}: its image cannot be decoded") from None
        etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'
        thumb = Thumbnail(data, etag, width, height)
        self._store(key, thumb)
        return thumb

    def image_path(self, item_id: int) -> Path:
        """The image file recorded for ``item_id`` (a relative record is taken relative to the index directory).

        Raises:
            ThumbnailNotFoundError: the id is not in the index or has no path recorded.
        """
        row = self.index_dir.metadata.get(item_id) if 0 <= item_id < 2**63 else None
        if row is None:
            raise ThumbnailNotFoundError(f"no item with id {item_id} in the index")
        if not row.path:
            raise ThumbnailNotFoundError(f"item {item_id} has no image file recorded in the index")
        path = Path(row.path)
        return path if path.is_absolute() else self.index_dir.path / path

    def cached(self) -> int:
        """Number of thumbnails in the cache."""
        with self._lock:
            return len(self._cache)

    def _store(self, key: tuple, thumb: Thumbnail) -> None:
        if len(thumb.data) > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = thumb
            self._cached_bytes += len(thumb.data)
            while len(self._cache) > self.max_entries or self._cached_bytes > self.max_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old.data)


def _regular_file_stat(path: Path, item_id: int) -> os.stat_result:
    """``stat`` of ``path`` (links followed) if it is a regular file of acceptable size; else not found.

    A FIFO or device recorded as a path (``/dev/zero``) would block or never end; a directory is no image.
    """
    try:
        info = path.stat()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the recorded path
        logger.warning("thumbnail of item %d: image file %s is not available: %s", item_id, path, exc)
        raise ThumbnailNotFoundError(f"no thumbnail for item {item_id}: its image file is not available") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        raise ThumbnailNotFoundError(f"no thumbnail for item {item_id}: its image record is not a readable file")
    if info.st_size > MAX_SOURCE_BYTES:
        raise ThumbnailNotFoundError(
            f"no thumbnail for item {item_id}: its image is larger than {MAX_SOURCE_BYTES // (1024 * 1024)} MiB"
        )
    return info
