"""``calibration.png``: the positive and negative pair scores of every level, with its threshold, as one picture.

A table of quantiles says that classes overlap; a histogram shows how, and where the threshold cuts. One
panel per level (finest first) draws, from the exact pair histograms of the calibration
(:class:`indexing.calibration.PairCounts`), the share of that level's positive pairs (same class) and of
its negative pairs (the others) falling in each display bin; each class is normalised to its own total, so
a few thousand positives stay visible beside millions of negatives. The threshold is a vertical line, and
the panel's title gives the level's threshold, precision, recall, F1 and AUC. All panels share one x range,
the scores that occur, so the thresholds can be compared by eye; a threshold outside it (F1 can be best when
every pair passes, which puts the threshold below all scores) is a dashed line at the edge, labelled with its
value.

Drawn with Pillow alone (no plotting library), in ``O(levels * bins)``; written atomically beside the index
by :func:`write_calibration_plot`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.atomic import atomic_file

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

    from indexing.calibration import Calibration, PairCounts

__all__ = [
    "CALIBRATION_PLOT_FILE",
    "NEGATIVE_COLOUR",
    "POSITIVE_COLOUR",
    "THRESHOLD_COLOUR",
    "PlotLayout",
    "plot_layout",
    "render_calibration_plot",
    "write_calibration_plot",
]

#: File name of the plot inside an index directory.
CALIBRATION_PLOT_FILE = "calibration.png"
#: Outline colours of the positive-pair and negative-pair histograms and of the threshold line (RGB).
POSITIVE_COLOUR = (214, 96, 0)
NEGATIVE_COLOUR = (31, 100, 180)
THRESHOLD_COLOUR = (200, 0, 40)
_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_GRID = (225, 225, 225)
_FILL_ALPHA = 90
_WIDTH = 820
_HEADER = 30
_PANEL = 240
_LEFT, _RIGHT = 62, 24
_TOP, _BOTTOM = 48, 42  # panel title + legend above the plot area; tick labels + axis label below
_DISPLAY_BINS = 160
_FONT_SIZE = 13


@dataclass(frozen=True)
class PlotLayout:
    """Where things are in the picture, so that callers (and tests) need not guess.

    Attributes:
        size: ``(width, height)`` in pixels.
        panels: per level, finest first, the plot area ``(left, top, right, bottom)`` holding its histograms.
    """

    size: tuple[int, int]
    panels: tuple[tuple[int, int, int, int], ...]


def plot_layout(num_levels: int) -> PlotLayout:
    """The layout of a plot of ``num_levels`` levels: a header, then one panel of fixed height per level."""
    if num_levels < 1:
        raise ValueError(f"a calibration plot needs at least one level, got {num_levels}")
    panels = tuple(
        (_LEFT, _HEADER + k * _PANEL + _TOP, _WIDTH - _RIGHT, _HEADER + (k + 1) * _PANEL - _BOTTOM)
        for k in range(num_levels)
    )
    return PlotLayout((_WIDTH, _HEADER + num_levels * _PANEL), panels)


def render_calibration_plot(counts: PairCounts, calibration: Calibration) -> Image.Image:
    """Draw the per-level histograms and thresholds of ``calibration``, chosen on ``counts``, as an RGB image.

    Raises:
        ValueError: ``counts`` and ``calibration`` have different levels or grids.
    """
    from PIL import Image, ImageDraw

    if list(counts.levels) != calibration.level_names or counts.bins != calibration.bins:
        raise ValueError(
            f"pair counts ({list(counts.levels)}, {counts.bins} bins) are not those of the calibration "
            f"({calibration.level_names}, {calibration.bins} bins)"
        )
    layout = plot_layout(len(counts.levels))
    low, high = _score_range(counts, calibration)
    image = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    pairs = int(counts.total.sum())
    header = f"calibration: objective {calibration.objective}, {pairs:,} validation pairs"
    if calibration.diagnostics is not None:
        header += f", {len(calibration.warnings)} warning(s)"
    draw.text((_LEFT, 8), header, fill=_INK, font=font)
    for k, (entry, box) in enumerate(zip(calibration.levels, layout.panels, strict=True)):
        positives = counts.positives[k]
        negatives = counts.total - positives
        pos_share, neg_share = (_display_share(h, counts.edges, low, high) for h in (positives, negatives))
        top = max(float(pos_share.max()), float(neg_share.max()), 1e-12) * 1.08
        _frame(draw, font, box, low, high, top)
        for share, colour in ((neg_share, NEGATIVE_COLOUR), (pos_share, POSITIVE_COLOUR)):
            image = _bars(image, box, share, top, colour)
        draw = ImageDraw.Draw(image)
        for share, colour in ((neg_share, NEGATIVE_COLOUR), (pos_share, POSITIVE_COLOUR)):
            _outline(draw, box, share, top, colour)
        _threshold(draw, font, box, entry.threshold, low, high)
        auc = None if calibration.diagnostics is None else calibration.diagnostics.level(entry.level).auc
        title = (
            f"{entry.level}: threshold {entry.threshold:.4f}   precision {entry.precision:.3f}   "
            f"recall {entry.recall:.3f}   F1 {entry.f1:.3f}" + ("" if auc is None else f"   AUC {auc:.3f}")
        )
        draw.text((_LEFT, box[1] - _TOP + 6), title, fill=_INK, font=font)
        _legend(draw, font, (_LEFT, box[1] - 20), entry.level, int(positives.sum()), int(negatives.sum()))
    return image


def write_calibration_plot(path: str | Path, counts: PairCounts, calibration: Calibration) -> Path:
    """Render the plot and write it as PNG at ``path`` atomically (temporary sibling, fsync, ``os.replace``)."""
    path = Path(path)
    image = render_calibration_plot(counts, calibration)
    with atomic_file(path) as fh:
        image.save(fh, format="PNG", optimize=True)
    return path


def _score_range(counts: PairCounts, calibration: Calibration) -> tuple[float, float]:
    """The x range: every bin holding a pair (the thresholds without pairs), padded by 3%, within [-1, 1], >= 0.01."""
    occupied = np.flatnonzero(counts.total)
    step = 2.0 / counts.bins
    if occupied.size:
        values = [float(counts.edges[occupied[0]]), float(counts.edges[occupied[-1]]) + step]
    else:
        values = [entry.threshold for entry in calibration.levels]
    low, high = min(values), max(values)
    if high - low < 0.01:
        centre = (low + high) / 2
        low, high = centre - 0.005, centre + 0.005
    pad = 0.03 * (high - low)
    low, high = max(low - pad, -1.0), min(high + pad, 1.0)
    if high - low < 0.01:  # squeezed against -1 or 1
        low, high = (high - 0.01, high) if high >= 1.0 else (low, low + 0.01)
    return low, high


def _display_share(hist: np.ndarray, edges: np.ndarray, low: float, high: float) -> np.ndarray:
    """Rebin a grid histogram into display bins over [low, high]; each bin's share of the class's pairs."""
    step = edges[1] - edges[0]
    grid_bins = max(round(float((high - low) / step)), 1)
    bins = min(_DISPLAY_BINS, grid_bins)  # never narrower than the grid: no empty comb between grid bins
    centres = edges + step / 2
    index = np.clip(np.floor((centres - low) / (high - low) * bins), 0, bins - 1).astype(np.int64)
    share = np.bincount(index, weights=hist.astype(np.float64), minlength=bins)
    total = float(hist.sum())
    return share / total if total else share


def _x(value: float, box: tuple[int, int, int, int], low: float, high: float) -> float:
    return box[0] + (value - low) / (high - low) * (box[2] - box[0])


def _y(share: float, box: tuple[int, int, int, int], top: float) -> float:
    return box[3] - share / top * (box[3] - box[1])


def _bars(
    image: Image.Image, box: tuple[int, int, int, int], share: np.ndarray, top: float, colour: tuple[int, int, int]
) -> Image.Image:
    """Translucent filled bars, composited so the two classes show through each other where they overlap."""
    from PIL import Image, ImageDraw

    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = (box[2] - box[0]) / len(share)
    for j in np.flatnonzero(share):
        left = box[0] + j * width
        draw.rectangle((left, _y(float(share[j]), box, top), left + width, box[3]), fill=(*colour, _FILL_ALPHA))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _outline(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    share: np.ndarray,
    top: float,
    colour: tuple[int, int, int],
) -> None:
    """The histogram's outline as a solid step line (the class's own colour, 2 px), over the bins it occupies."""
    occupied = np.flatnonzero(share)
    if not occupied.size:
        return
    width = (box[2] - box[0]) / len(share)
    first, last = int(occupied[0]), int(occupied[-1])
    points = [(box[0] + first * width, float(box[3]))]
    for j in range(first, last + 1):
        y = _y(float(share[j]), box, top)
        points += [(box[0] + j * width, y), (box[0] + (j + 1) * width, y)]
    points.append((box[0] + (last + 1) * width, float(box[3])))
    draw.line(points, fill=colour, width=2)


def _frame(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: tuple[int, int, int, int],
    low: float,
    high: float,
    top: float,
) -> None:
    """Axes, grid lines and tick labels: x in cosine similarity, y in share of the class's pairs per bin."""
    left, upper, right, lower = box
    step = _nice_step((high - low) / 8)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    first = math.ceil(low / step - 1e-9)
    for n in range(first, math.floor(high / step + 1e-9) + 1):
        x = _x(n * step, box, low, high)
        draw.line((x, upper, x, lower), fill=_GRID)
        draw.line((x, lower, x, lower + 4), fill=_INK)
        label = f"{n * step:.{decimals}f}"
        _text(draw, (x, lower + 6), label, font, _INK, "centre")
    for fraction in (0.0, 0.5, 1.0):
        value = fraction * top / 1.08
        y = _y(value, box, top)
        draw.line((left - 4, y, left, y), fill=_INK)
        _text(draw, (left - 6, y), _percent(value), font, _INK, "right", middle=True)
    draw.rectangle(box, outline=_INK)
    _text(draw, (right, lower + 22), "cosine similarity", font, _INK, "right")
    _text(draw, (4, lower + 22), "share of each class's pairs per bin", font, _INK)


def _threshold(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: tuple[int, int, int, int],
    threshold: float,
    low: float,
    high: float,
) -> None:
    """The threshold as a vertical line; outside the x range, a dashed line at the nearer edge ("off scale")."""
    inside = low <= threshold <= high
    x = min(max(_x(threshold, box, low, high), box[0] + 1), box[2] - 1)
    if inside:
        draw.line((x, box[1], x, box[3]), fill=THRESHOLD_COLOUR, width=2)
    else:
        for y in range(box[1], box[3], 8):
            draw.line((x, y, x, min(y + 4, box[3])), fill=THRESHOLD_COLOUR, width=2)
    right_side = x < (box[0] + box[2]) / 2
    label = f"{threshold:.4f}" if inside else f"{threshold:.4f} (off scale)"
    _text(
        draw,
        (x + 4 if right_side else x - 4, box[1] + 3),
        label,
        font,
        THRESHOLD_COLOUR,
        "left" if right_side else "right",
    )


def _legend(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    origin: tuple[int, int],
    level: str,
    positives: int,
    negatives: int,
) -> None:
    x, y = origin
    entries = (
        (POSITIVE_COLOUR, f"same {level} ({positives:,} pairs)"),
        (NEGATIVE_COLOUR, f"other ({negatives:,} pairs)"),
        (THRESHOLD_COLOUR, "threshold"),
    )
    for colour, text in entries:
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=colour)
        draw.text((x + 15, y), text, fill=_INK, font=font)
        x += 15 + int(draw.textlength(text, font=font)) + 18


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    align: str = "left",
    middle: bool = False,
) -> None:
    """Text whose left edge, centre or right edge is at ``x`` and whose top (or middle) is at ``y``.

    Positioned from the text's bounding box rather than Pillow's anchors, which bitmap fonts do not support.
    """
    left, upper, right, lower = draw.textbbox((0, 0), text, font=font)
    x, y = xy
    x -= {"left": left, "centre": (left + right) / 2, "right": right}[align]
    y -= (upper + lower) / 2 if middle else upper
    draw.text((x, y), text, fill=fill, font=font)


def _nice_step(rough: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``rough``."""
    magnitude = 10.0 ** math.floor(math.log10(rough))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * magnitude >= rough * (1 - 1e-9):
            return factor * magnitude
    return 10.0 * magnitude


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%" if value == 0 or value >= 0.1 else f"{100 * value:.1f}%"


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a readable size (its small bitmap font where Pillow lacks FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
