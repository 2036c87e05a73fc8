"""A contact sheet: one row per query, its thumbnail then its top hits, with scores, levels and labels.

Numbers like R@1 say how often retrieval is right; a sheet shows *how* it is right or wrong
(colour confused with shape, a near-duplicate missed), which is what a person checking a
model or a quickstart run wants to see. So that the sheet reads on its own, a legend at the top
names every frame colour, and labels are wrapped onto as many lines as they need, never cut.

Each hit's frame says how close it is to its query, on the same ruler as the granularity levels
(green for the finest level, through yellow, to orange for the coarsest, red for neither):

* when the query's labels are known, by the finest level at which the hit shares the query's class
  ("same fine", "same middle", "same coarse", "different");
* otherwise, on a calibrated index, by the hit's calibrated level, the finest level whose similarity
  threshold its score reaches ("fine", "middle", "coarse", "no level");
* grey when neither is known.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from PIL import Image, ImageDraw, ImageFont, ImageOps

from indexing import SearchHit, SearchResults

__all__ = [
    "LegendEntry",
    "contact_sheet_size",
    "frame_legend",
    "level_colours",
    "render_contact_sheet",
    "wrap_text",
]

#: Space between cells and around the sheet, in pixels.
PAD = 6
#: Extra gap between the query column and its hits.
QUERY_GAP = 10
#: Width of the coloured frame around each thumbnail.
BORDER = 4
#: Height of one line of text (PIL's default font is ~11 px high).
LINE_HEIGHT = 13
#: Side of a legend colour swatch, and the gaps around its text.
SWATCH = 10
_SWATCH_GAP = 4
_ITEM_GAP = 14

RGB = tuple[int, int, int]
BACKGROUND: RGB = (255, 255, 255)
TEXT: RGB = (20, 20, 20)
#: The hit shares the query's class at no level (or reaches no calibrated threshold).
DIFFERENT: RGB = (190, 0, 0)
#: Neither the query's labels nor a calibration says how close the hit is.
UNKNOWN: RGB = (150, 150, 150)
QUERY: RGB = (40, 90, 200)
PLACEHOLDER: RGB = (225, 225, 225)
#: The ruler's colours from the finest level (green) to the coarsest (orange); more levels interpolate.
_RULER: tuple[RGB, ...] = ((0, 150, 60), (160, 190, 0), (250, 160, 0))

_AGREEMENT = "labels"
_CALIBRATED = "level"
_HEADINGS = {
    _AGREEMENT: "frame: finest label shared with the query",
    _CALIBRATED: "frame: calibrated level of each hit",
    "unknown": "frame:",
}
#: Characters after which a long label may be broken onto the next line.
_BREAK_AFTER = frozenset(" -_/.,:;|")

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class LegendEntry:
    """One frame colour and what it means (``"same middle"``, ``"no level"``...)."""

    colour: RGB
    text: str


def level_colours(count: int) -> list[RGB]:
    """Frame colours for ``count`` label levels, finest first: green, through yellow, to orange.

    Interpolated along the same ruler for any number of levels, so "how close" always reads the same way.
    """
    if count <= 0:
        return []
    if count == 1:
        return [_RULER[0]]
    colours = []
    for i in range(count):
        position = i * (len(_RULER) - 1) / (count - 1)
        low = min(int(position), len(_RULER) - 2)
        weight = position - low
        a, b = _RULER[low], _RULER[low + 1]
        colours.append(tuple(round(x + weight * (y - x)) for x, y in zip(a, b, strict=True)))
    return colours  # type: ignore[return-value]


def frame_legend(mode: str, levels: Sequence[str]) -> list[LegendEntry]:
    """Every frame colour of one colouring ``mode`` (``"labels"``, ``"level"`` or ``"unknown"``) and its meaning.

    Args:
        mode: ``"labels"`` (agreement with the query's labels), ``"level"`` (the hit's calibrated level) or
            ``"unknown"`` (neither is known).
        levels: the label levels (``"labels"``) or the calibrated levels (``"level"``), finest first.
    """
    if mode == "unknown":
        return [LegendEntry(UNKNOWN, "closeness unknown")]
    colours = level_colours(len(levels))
    if mode == _AGREEMENT:
        same = [LegendEntry(colour, f"same {level}") for colour, level in zip(colours, levels, strict=True)]
        return [*same, LegendEntry(DIFFERENT, "different")]
    if mode == _CALIBRATED:
        reached = [LegendEntry(colour, level) for colour, level in zip(colours, levels, strict=True)]
        return [*reached, LegendEntry(DIFFERENT, "no level")]
    raise ValueError(f"unknown frame colouring {mode!r}; expected labels, level or unknown")


def wrap_text(text: str, font: Font, width: float) -> list[str]:
    """Split ``text`` into lines at most ``width`` pixels wide, nothing dropped: ``"".join(lines) == text``.

    Lines break after a space or punctuation (``-_/.,:;|``) where one falls inside the line, else between
    two characters, so a label of any length is shown whole instead of cut off with an ellipsis.
    """
    lines: list[str] = []
    rest = text
    while rest:
        if font.getlength(rest) <= width:
            lines.append(rest)
            break
        fits = 1  # the longest prefix that fits (at least one character, so that the loop always advances)
        while fits < len(rest) and font.getlength(rest[: fits + 1]) <= width:
            fits += 1
        breaks = [i + 1 for i in range(fits) if rest[i] in _BREAK_AFTER]
        cut = breaks[-1] if breaks and fits < len(rest) else fits
        lines.append(rest[:cut])
        rest = rest[cut:]
    return lines or [""]


def contact_sheet_size(
    rows: int, columns: int, thumb: int, text_lines: int, legend_lines: int = 0, min_width: int = 0
) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a sheet with ``rows`` queries and ``columns`` cells per row.

    ``columns`` counts the query cell; ``text_lines`` is the number of text lines under each thumbnail
    (title, level, wrapped labels); ``legend_lines`` the legend's lines above the grid; ``min_width`` the
    widest legend item plus margins (the sheet is widened to show it whole).
    """
    cell_w, cell_h = _cell_size(thumb, text_lines)
    width = PAD + columns * (cell_w + PAD) + (QUERY_GAP if columns > 1 else 0)
    height = _grid_top(legend_lines) + max(rows, 1) * (cell_h + PAD)
    return max(width, min_width), height


def render_contact_sheet(
    queries: Sequence[tuple[Image.Image, Mapping[str, str]]],
    results: Sequence[SearchResults],
    resolve_image: Callable[[SearchHit], Image.Image | None],
    out_path: str | Path,
    thumb: int = 96,
    *,
    calibrated_levels: Sequence[str] | None = None,
    query_names: Sequence[str] | None = None,
) -> Path:
    """Draw a PNG grid of queries and their hits, with a legend, and write it atomically to ``out_path``.

    Args:
        queries: each query image with its labels (``{level: name}``; empty when unknown).
        results: the search results, one per query, in the same order.
        resolve_image: returns a hit's image, or ``None`` when it cannot be found (a grey
            placeholder is drawn then).
        out_path: the PNG file to write.
        thumb: side of the square thumbnails in pixels.
        calibrated_levels: the index's calibrated levels, finest first (the keys of its thresholds); when
            given, each hit shows its level, and the hits of a query without labels are coloured by it.
        query_names: a name shown under each query (its file name, say).

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: ``queries``, ``results`` and ``query_names`` differ in length, or ``thumb`` is too small.
    """
    if len(queries) != len(results):
        raise ValueError(f"got {len(queries)} queries but {len(results)} result lists")
    if query_names is not None and len(query_names) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(query_names)} query names")
    if thumb < 16:
        raise ValueError(f"thumb must be at least 16 pixels, got {thumb}")
    font = ImageFont.load_default()
    levels = _levels(queries, results)
    calibrated = list(calibrated_levels or [])
    cell_w, _ = _cell_size(thumb, 0)
    cells = [
        [
            _query_lines(labels, levels, None if query_names is None else query_names[row], font, cell_w),
            *(_hit_lines(rank, hit, levels, calibrated, font, cell_w) for rank, hit in enumerate(hits, start=1)),
        ]
        for row, ((_, labels), hits) in enumerate(zip(queries, results, strict=True))
    ]
    frames = [
        [_frame(labels, hit, levels, calibrated) for hit in hits]
        for (_, labels), hits in zip(queries, results, strict=True)
    ]
    legend = _legend(frames, levels, calibrated)
    text_lines = max((len(lines) for row in cells for lines in row), default=1)
    columns = 1 + max((len(r) for r in results), default=0)
    grid_w, _ = contact_sheet_size(len(queries), columns, thumb, text_lines)
    legend_rows, legend_w = _layout_legend(legend, font, grid_w - 2 * PAD)
    size = contact_sheet_size(len(queries), columns, thumb, text_lines, len(legend_rows), legend_w + 2 * PAD)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_legend(draw, font, legend_rows)
    _, cell_h = _cell_size(thumb, text_lines)
    top = _grid_top(len(legend_rows))
    for row, (image, _labels) in enumerate(queries):
        y = top + row * (cell_h + PAD)
        _draw_cell(sheet, draw, font, (PAD, y), image, QUERY, cells[row][0], thumb)
        for col, (hit, (_mode, colour)) in enumerate(zip(results[row], frames[row], strict=True), start=1):
            x = PAD + QUERY_GAP + col * (cell_w + PAD)
            _draw_cell(sheet, draw, font, (x, y), resolve_image(hit), colour, cells[row][col], thumb)
    return _save_png(sheet, Path(out_path))


def _cell_size(thumb: int, text_lines: int) -> tuple[int, int]:
    side = thumb + 2 * BORDER
    return side, side + 2 + text_lines * LINE_HEIGHT


def _grid_top(legend_lines: int) -> int:
    return PAD + (legend_lines * LINE_HEIGHT + PAD if legend_lines else 0)


def _levels(queries: Sequence[tuple[Image.Image, Mapping[str, str]]], results: Sequence[SearchResults]) -> list[str]:
    """Label levels to print, in first-seen order (queries first, so their order wins)."""
    seen: dict[str, None] = {}
    for _image, labels in queries:
        seen.update(dict.fromkeys(labels))
    for hits in results:
        for hit in hits:
            seen.update(dict.fromkeys(hit.labels))
    return list(seen)


def _frame(
    query: Mapping[str, str], hit: SearchHit, levels: Sequence[str], calibrated: Sequence[str]
) -> tuple[str, RGB]:
    """How the hit is coloured: ``(mode, colour)``, by label agreement first, then by calibrated level."""
    compared = [level for level in levels if level in query and level in hit.labels]
    if compared:
        colours = level_colours(len(levels))
        for level in compared:  # finest first
            if query[level] == hit.labels[level]:
                return _AGREEMENT, colours[levels.index(level)]
        return _AGREEMENT, DIFFERENT
    if calibrated:
        if hit.level in calibrated:
            return _CALIBRATED, level_colours(len(calibrated))[list(calibrated).index(hit.level)]
        return _CALIBRATED, DIFFERENT
    return "unknown", UNKNOWN


def _legend(
    frames: Sequence[Sequence[tuple[str, RGB]]], levels: Sequence[str], calibrated: Sequence[str]
) -> list[tuple[str, list[LegendEntry]]]:
    """A heading and the full colour key of every colouring the sheet uses, in a fixed order."""
    used = {mode for row in frames for mode, _ in row}
    modes = [mode for mode in (_AGREEMENT, _CALIBRATED, "unknown") if mode in used]
    return [(_HEADINGS[mode], frame_legend(mode, levels if mode == _AGREEMENT else calibrated)) for mode in modes]


def _query_lines(
    labels: Mapping[str, str], levels: Sequence[str], name: str | None, font: Font, width: int
) -> list[str]:
    lines = ["query"]
    if name is not None:
        lines += wrap_text(name, font, width)
    return lines + _label_lines(labels, levels, font, width)


def _hit_lines(
    rank: int, hit: SearchHit, levels: Sequence[str], calibrated: Sequence[str], font: Font, width: int
) -> list[str]:
    lines = wrap_text(f"#{rank}  {hit.score:.3f}", font, width)
    if calibrated:
        lines += wrap_text(f"level: {hit.level or 'none'}", font, width)
    if not levels and hit.path:  # an unlabelled gallery: the file name is all there is to tell hits apart
        lines += wrap_text(PurePath(hit.path).name, font, width)
    return lines + _label_lines(hit.labels, levels, font, width)


def _label_lines(labels: Mapping[str, str], levels: Sequence[str], font: Font, width: int) -> list[str]:
    return [line for level in levels for line in wrap_text(f"{level}: {labels.get(level, '-')}", font, width)]


def _layout_legend(
    legend: Sequence[tuple[str, Sequence[LegendEntry]]], font: Font, width: int
) -> tuple[list[list[tuple[str, RGB | None]]], int]:
    """Flow the legend into lines of at most ``width`` pixels: each mode's heading starts a line, its entries
    follow. Returns the lines (``(text, swatch colour or None)`` items) and the widest item's width."""
    rows: list[list[tuple[str, RGB | None]]] = []
    widest = 0
    for heading, entries in legend:
        row: list[tuple[str, RGB | None]] = [(heading, None)]
        used = _item_width(heading, None, font)
        widest = max(widest, used)
        for entry in entries:
            item = _item_width(entry.text, entry.colour, font)
            widest = max(widest, item)
            if used + _ITEM_GAP + item > width:
                rows.append(row)
                row, used = [], -_ITEM_GAP
            row.append((entry.text, entry.colour))
            used += _ITEM_GAP + item
        rows.append(row)
    return rows, widest


def _item_width(text: str, colour: RGB | None, font: Font) -> int:
    return math.ceil(font.getlength(text)) + (SWATCH + _SWATCH_GAP if colour is not None else 0)


def _draw_legend(draw: ImageDraw.ImageDraw, font: Font, rows: Sequence[Sequence[tuple[str, RGB | None]]]) -> None:
    for i, row in enumerate(rows):
        x, y = PAD, PAD + i * LINE_HEIGHT
        for text, colour in row:
            if colour is not None:
                top = y + (LINE_HEIGHT - SWATCH) // 2
                draw.rectangle((x, top, x + SWATCH - 1, top + SWATCH - 1), fill=colour)
                x += SWATCH + _SWATCH_GAP
            draw.text((x, y), text, fill=TEXT, font=font)
            x += math.ceil(font.getlength(text)) + _ITEM_GAP


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: Font,
    origin: tuple[int, int],
    image: Image.Image | None,
    frame: RGB,
    lines: Sequence[str],
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
        ImageDraw.Draw(tile).text((4, thumb // 2 - 6), "missing", fill=UNKNOWN, font=font)
    sheet.paste(tile, (x + BORDER, y + BORDER))
    for i, line in enumerate(lines):
        draw.text((x, y + side + 2 + i * LINE_HEIGHT), line, fill=TEXT, font=font)


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
