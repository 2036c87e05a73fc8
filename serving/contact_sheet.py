"""A contact sheet: one row per query, its thumbnail then its top hits, with scores and labels.

Numbers like R@1 say how often retrieval is right; a sheet shows *how* it is right or wrong
(colour confused with shape, a near-duplicate missed), which is what a person checking a
model or a quickstart run wants to see. Each hit is framed green when its fine label equals
the query's and red when it does not (grey when either label is unknown).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from indexing import SearchHit, SearchResults

__all__ = ["contact_sheet_size", "render_contact_sheet"]

#: Space between cells and around the sheet, in pixels.
PAD = 6
#: Extra gap between the query column and its hits.
QUERY_GAP = 10
#: Width of the coloured frame around each thumbnail.
BORDER = 3
#: Height of one line of text under a thumbnail (PIL's default font is ~11 px high).
LINE_HEIGHT = 13

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MATCH = (0, 150, 60)
MISMATCH = (210, 30, 30)
UNKNOWN = (150, 150, 150)
QUERY = (40, 90, 200)
PLACEHOLDER = (225, 225, 225)


def contact_sheet_size(rows: int, columns: int, thumb: int, text_lines: int) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a sheet with ``rows`` queries and ``columns`` cells per row.

    ``columns`` counts the query cell; ``text_lines`` is the number of text lines under each
    thumbnail (one title line plus one per label level).
    """
    cell_w, cell_h = _cell_size(thumb, text_lines)
    width = PAD + columns * (cell_w + PAD) + (QUERY_GAP if columns > 1 else 0)
    height = PAD + max(rows, 1) * (cell_h + PAD)
    return width, height


def render_contact_sheet(
    queries: Sequence[tuple[Image.Image, Mapping[str, str]]],
    results: Sequence[SearchResults],
    resolve_image: Callable[[SearchHit], Image.Image | None],
    out_path: str | Path,
    thumb: int = 96,
    fine_level: str | None = None,
) -> Path:
    """Draw a PNG grid of queries and their hits and write it atomically to ``out_path``.

    Args:
        queries: each query image with its labels (``{level: name}``; may be empty).
        results: the search results, one per query, in the same order.
        resolve_image: returns a hit's image, or ``None`` when it cannot be found (a grey
            placeholder is drawn then).
        out_path: the PNG file to write.
        thumb: side of the square thumbnails in pixels.
        fine_level: label level compared to colour the frames; default ``"fine"`` when the query has
            it, else the query's first level.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: ``queries`` and ``results`` differ in length, or ``thumb`` is too small.
    """
    if len(queries) != len(results):
        raise ValueError(f"got {len(queries)} queries but {len(results)} result lists")
    if thumb < 16:
        raise ValueError(f"thumb must be at least 16 pixels, got {thumb}")
    levels = _levels(queries, results)
    text_lines = 1 + len(levels)
    columns = 1 + max((len(r) for r in results), default=0)
    sheet = Image.new("RGB", contact_sheet_size(len(queries), columns, thumb, text_lines), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cell_w, cell_h = _cell_size(thumb, text_lines)
    for row, ((image, labels), hits) in enumerate(zip(queries, results, strict=True)):
        y = PAD + row * (cell_h + PAD)
        _draw_cell(sheet, draw, font, (PAD, y), image, QUERY, "query", labels, levels, thumb)
        level = fine_level or ("fine" if "fine" in labels else next(iter(labels), None))
        for col, hit in enumerate(hits, start=1):
            x = PAD + QUERY_GAP + col * (cell_w + PAD)
            colour = _frame_colour(labels, hit.labels, level)
            title = f"#{col}  {hit.score:.3f}"
            _draw_cell(sheet, draw, font, (x, y), resolve_image(hit), colour, title, hit.labels, levels, thumb)
    return _save_png(sheet, Path(out_path))


def _cell_size(thumb: int, text_lines: int) -> tuple[int, int]:
    side = thumb + 2 * BORDER
    return side, side + 2 + text_lines * LINE_HEIGHT


def _levels(queries: Sequence[tuple[Image.Image, Mapping[str, str]]], results: Sequence[SearchResults]) -> list[str]:
    """Label levels to print, in first-seen order (queries first, so their order wins)."""
    seen: dict[str, None] = {}
    for _image, labels in queries:
        seen.update(dict.fromkeys(labels))
    for hits in results:
        for hit in hits:
            seen.update(dict.fromkeys(hit.labels))
    return list(seen)


def _frame_colour(query: Mapping[str, str], hit: Mapping[str, str], level: str | None) -> tuple[int, int, int]:
    if level is None or level not in query or level not in hit:
        return UNKNOWN
    return MATCH if query[level] == hit[level] else MISMATCH


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    origin: tuple[int, int],
    image: Image.Image | None,
    frame: tuple[int, int, int],
    title: str,
    labels: Mapping[str, str],
    levels: Sequence[str],
    thumb: int,
) -> None:
    x, y = origin
    side = thumb + 2 * BORDER
    draw.rectangle((x, y, x + side - 1, y + side - 1), fill=frame)
    tile = Image.new("RGB", (thumb, thumb), PLACEHOLDER)
    if image is not None:
        small = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
        tile.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    else:
        draw_tile = ImageDraw.Draw(tile)
        draw_tile.text((4, thumb // 2 - 6), "missing", fill=UNKNOWN, font=font)
    sheet.paste(tile, (x + BORDER, y + BORDER))
    lines = [title, *(f"{level}: {labels.get(level, '-')}" for level in levels)]
    for i, line in enumerate(lines):
        text = _fit(line, font, side)
        draw.text((x, y + side + 2 + i * LINE_HEIGHT), text, fill=TEXT, font=font)


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _save_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
