"""Contact sheet: a PNG grid of queries and hits, frames coloured by closeness, a legend, labels shown whole."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from indexing import SearchHit, SearchResults
from serving.contact_sheet import (
    BORDER,
    DIFFERENT,
    LINE_HEIGHT,
    PAD,
    QUERY,
    QUERY_GAP,
    SWATCH,
    UNKNOWN,
    contact_sheet_size,
    frame_legend,
    level_colours,
    render_contact_sheet,
    wrap_text,
)

LEVELS = ["fine", "middle", "coarse"]
RED = {"fine": "red-square", "middle": "square", "coarse": "polygon"}


def _tile(colour: tuple[int, int, int], size: tuple[int, int] = (50, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _grid_top(pixels: np.ndarray) -> int:
    """First row of the first query's frame (the legend sits above it)."""
    column = pixels[:, PAD + 1]
    return int(np.flatnonzero((column == QUERY).all(axis=1))[0])


def _frame_colour(pixels: np.ndarray, top: int, thumb: int, row: int, column: int, text_lines: int) -> tuple:
    cell_w = thumb + 2 * BORDER
    cell_h = cell_w + 2 + text_lines * LINE_HEIGHT
    y = top + row * (cell_h + PAD) + 1
    x = PAD + (QUERY_GAP if column else 0) + column * (cell_w + PAD) + 1
    return tuple(int(v) for v in pixels[y, x])


def _swatches(pixels: np.ndarray, band_end: int) -> list[tuple[tuple[int, int, int], int, int]]:
    """Solid SWATCH x SWATCH squares in the legend band: ``(colour, x, y)`` of their top-left corners."""
    found = []
    band = pixels[:band_end]
    for y in range(band.shape[0] - SWATCH + 1):
        for x in range(band.shape[1] - SWATCH + 1):
            colour = band[y, x]
            if tuple(colour) == (255, 255, 255) or (x and (band[y, x - 1] == colour).all()):
                continue
            if y and (band[y - 1, x] == colour).all():
                continue
            if (band[y : y + SWATCH, x : x + SWATCH] == colour).all():
                found.append((tuple(int(v) for v in colour), x, y))
    return found


def test_contact_sheet_layout_frames_and_legend(tmp_path):
    thumb = 120
    queries = [
        (_tile((200, 0, 0)), RED),
        (_tile((0, 0, 200)), {"fine": "blue-disc", "middle": "disc", "coarse": "round"}),
    ]
    results = [
        SearchResults(
            (
                SearchHit(0, 0.99, "a.png", dict(RED)),  # same fine
                SearchHit(1, 0.80, "b.png", {**RED, "fine": "green-square"}),  # same middle
                SearchHit(2, 0.60, "c.png", {"fine": "red-hexagon", "middle": "hexagon", "coarse": "polygon"}),
                SearchHit(3, 0.40, "gone.png", {"fine": "blue-disc", "middle": "disc", "coarse": "round"}),
            )
        ),
        SearchResults((SearchHit(3, 0.97, "d.png", {"fine": "blue-disc", "middle": "disc", "coarse": "round"}),)),
    ]
    images = {0: _tile((200, 0, 0)), 1: _tile((0, 0, 200), (30, 60)), 2: _tile((0, 200, 0)), 3: _tile((9, 9, 9))}
    resolve = lambda hit: images.get(hit.id) if hit.path != "gone.png" else None  # noqa: E731
    out = render_contact_sheet(queries, results, resolve, tmp_path / "sub" / "sheet.png", thumb)

    assert out == tmp_path / "sub" / "sheet.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sheet.png"]  # no temporary file left
    sheet = Image.open(out)
    assert sheet.format == "PNG" and sheet.mode == "RGB"
    pixels = np.asarray(sheet)
    top = _grid_top(pixels)
    legend_lines = (top - 2 * PAD) // LINE_HEIGHT
    assert legend_lines >= 1 and top == PAD + legend_lines * LINE_HEIGHT + PAD  # the legend sits above the grid
    # 2 rows; 1 query + 4 hit columns; title + 3 label levels under each thumbnail (short labels: one line each).
    assert sheet.size == contact_sheet_size(rows=2, columns=5, thumb=thumb, text_lines=4, legend_lines=legend_lines)

    same_fine, same_middle, same_coarse = level_colours(3)
    frames = [_frame_colour(pixels, top, thumb, 0, column, text_lines=4) for column in range(5)]
    assert frames == [QUERY, same_fine, same_middle, same_coarse, DIFFERENT]  # placeholder still framed by label
    assert _frame_colour(pixels, top, thumb, 1, 1, text_lines=4) == same_fine
    # The resolved hit image is drawn inside its frame (red tile, letterboxed in the thumbnail).
    cell = thumb + 2 * BORDER
    centre = tuple(pixels[top + BORDER + thumb // 2, PAD + QUERY_GAP + (cell + PAD) + BORDER + thumb // 2])
    assert centre == (200, 0, 0)

    # The legend names every frame colour of this colouring, in ruler order, each swatch followed by its text.
    entries = frame_legend("labels", LEVELS)
    assert [e.text for e in entries] == ["same fine", "same middle", "same coarse", "different"]
    swatches = _swatches(pixels, top)
    assert [colour for colour, _, _ in swatches] == [e.colour for e in entries]
    for _, x, y in swatches:
        text = pixels[y : y + SWATCH, x + SWATCH + 2 : x + SWATCH + 30]
        assert (text.sum(axis=2) < 200).any()  # dark text right of the swatch


def test_unlabelled_queries_are_coloured_by_calibrated_level(tmp_path):
    thumb = 32
    hits = SearchResults(
        (
            SearchHit(0, 0.9, "a.png", {"fine": "x"}, level="fine"),
            SearchHit(1, 0.7, "b.png", {"fine": "y"}, level="coarse"),
            SearchHit(2, 0.1, "c.png", {"fine": "z"}, level=None),
        )
    )
    out = render_contact_sheet(
        [(_tile((1, 2, 3)), {})], [hits], lambda hit: None, tmp_path / "s.png", thumb, calibrated_levels=LEVELS
    )
    pixels = np.asarray(Image.open(out))
    top = _grid_top(pixels)
    # title, "level: ...", "fine: ..." under each hit; the query has "query" and "fine: -"
    frames = [_frame_colour(pixels, top, thumb, 0, column, text_lines=3) for column in (1, 2, 3)]
    fine, _, coarse = level_colours(3)
    assert frames == [fine, coarse, DIFFERENT]
    entries = frame_legend("level", LEVELS)
    assert [e.text for e in entries] == ["fine", "middle", "coarse", "no level"]
    assert [colour for colour, _, _ in _swatches(pixels, top)] == [e.colour for e in entries]

    # neither labels nor a calibration: grey frames, and the legend says so
    out = render_contact_sheet([(_tile((1, 2, 3)), {})], [hits], lambda hit: None, tmp_path / "u.png", thumb)
    pixels = np.asarray(Image.open(out))
    top = _grid_top(pixels)
    assert _frame_colour(pixels, top, thumb, 0, 1, text_lines=2) == UNKNOWN
    assert [colour for colour, _, _ in _swatches(pixels, top)] == [UNKNOWN]


def test_long_labels_are_wrapped_whole_never_cut(tmp_path):
    font = ImageFont.load_default()
    label = "an-extraordinarily-long-fine-label_with/separators.and.a_token_without_any_break_ABCDEFGHIJKLMNOPQRSTUVW"
    lines = wrap_text(label, font, 60)
    assert "".join(lines) == label and len(lines) >= 4  # nothing dropped, nothing added (no ellipsis)
    assert all(font.getlength(line) <= 60 for line in lines)
    assert lines[0].endswith("-")  # broken after a separator where one fits
    assert wrap_text("short", font, 60) == ["short"] and wrap_text("", font, 60) == [""]

    thumb = 48
    hit = SearchHit(0, 0.5, "a.png", {"fine": label})
    out = render_contact_sheet([(_tile((0, 0, 0)), {"fine": "q"})], [SearchResults((hit,))], lambda h: None,
                               tmp_path / "long.png", thumb)  # fmt: skip
    pixels = np.asarray(Image.open(out))
    cell = thumb + 2 * BORDER
    wrapped = wrap_text(f"fine: {label}", font, cell)
    # the sheet grows to hold every line: title + the wrapped label
    assert Image.open(out).size[1] == contact_sheet_size(1, 2, thumb, 1 + len(wrapped), legend_lines=_legend(pixels))[1]
    top = _grid_top(pixels)
    x = PAD + QUERY_GAP + cell + PAD
    text_top = top + cell + 2 + LINE_HEIGHT  # below the title line
    for i in range(len(wrapped)):  # ink on every line of the label, all of it inside the cell's column
        band = pixels[text_top + i * LINE_HEIGHT : text_top + (i + 1) * LINE_HEIGHT]
        assert (band[:, x : x + cell].sum(axis=2) < 300).any(), i
        assert not (band[:, x + cell :].sum(axis=2) < 300).any(), i  # never spills into the next column


def _legend(pixels: np.ndarray) -> int:
    return (_grid_top(pixels) - 2 * PAD) // LINE_HEIGHT


def test_level_colours_run_from_green_to_orange():
    assert level_colours(0) == [] and len(level_colours(1)) == 1
    three = level_colours(3)
    assert len(set(three)) == 3 and DIFFERENT not in three
    five = level_colours(5)
    assert five[0] == three[0] and five[2] == three[1] and five[4] == three[2]  # interpolated along one ruler
    with pytest.raises(ValueError, match="unknown frame colouring"):
        frame_legend("bogus", LEVELS)


def test_contact_sheet_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="2 queries but 1 result"):
        render_contact_sheet(
            [(_tile((0, 0, 0)), {}), (_tile((0, 0, 0)), {})], [SearchResults()], lambda h: None, tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="1 queries but 2 query names"):
        render_contact_sheet(
            [(_tile((0, 0, 0)), {})], [SearchResults()], lambda h: None, tmp_path / "x.png", query_names=["a", "b"]
        )
