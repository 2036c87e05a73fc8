"""Contact sheet: a PNG grid of queries and hits with match-coloured frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexing import SearchHit, SearchResults
from serving.contact_sheet import BORDER, MATCH, MISMATCH, PAD, QUERY_GAP, contact_sheet_size, render_contact_sheet


def _tile(colour: tuple[int, int, int], size: tuple[int, int] = (50, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_contact_sheet_layout_and_frames(tmp_path):
    thumb = 40
    queries = [
        (_tile((200, 0, 0)), {"fine": "red", "middle": "warm"}),
        (_tile((0, 0, 200)), {"fine": "blue", "middle": "cool"}),
    ]
    results = [
        SearchResults(
            (
                SearchHit(0, 0.99, "a.png", {"fine": "red", "middle": "warm"}),
                SearchHit(1, 0.50, "b.png", {"fine": "blue", "middle": "cool"}),
                SearchHit(2, 0.40, "gone.png", {"fine": "red", "middle": "warm"}),
            )
        ),
        SearchResults((SearchHit(1, 0.97, "b.png", {"fine": "blue", "middle": "cool"}),)),
    ]
    images = {0: _tile((200, 0, 0)), 1: _tile((0, 0, 200), (30, 60))}
    out = render_contact_sheet(queries, results, lambda hit: images.get(hit.id), tmp_path / "sub" / "sheet.png", thumb)

    assert out == tmp_path / "sub" / "sheet.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sheet.png"]  # no temporary file left
    sheet = Image.open(out)
    assert sheet.format == "PNG" and sheet.mode == "RGB"
    # 2 rows; 1 query + 3 hit columns; one title line + 2 label levels under each thumbnail.
    assert sheet.size == contact_sheet_size(rows=2, columns=4, thumb=thumb, text_lines=3)
    cell = thumb + 2 * BORDER
    assert sheet.size[0] == PAD + 4 * (cell + PAD) + QUERY_GAP

    pixels = np.asarray(sheet)
    row0 = PAD + 1  # inside the top frame edge of the first row

    def frame_at(column: int) -> tuple[int, ...]:
        x = PAD + QUERY_GAP + column * (cell + PAD) + 1
        return tuple(pixels[row0, x])

    assert frame_at(1) == MATCH  # red query, red hit
    assert frame_at(2) == MISMATCH  # red query, blue hit
    assert frame_at(3) == MATCH  # unresolved image: placeholder, still framed by label
    # The resolved hit image is drawn inside its frame (red tile, letterboxed in the thumbnail).
    centre = tuple(pixels[PAD + BORDER + thumb // 2, PAD + QUERY_GAP + (cell + PAD) + BORDER + thumb // 2])
    assert centre == (200, 0, 0)


def test_contact_sheet_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="2 queries but 1 result"):
        render_contact_sheet(
            [(_tile((0, 0, 0)), {}), (_tile((0, 0, 0)), {})], [SearchResults()], lambda h: None, tmp_path / "x.png"
        )
