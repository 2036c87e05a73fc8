"""Procedural rendering of one synthetic image: a textured, coloured shape on a cluttered background.

The three label levels of the synthetic dataset map to what is drawn: the shape family (coarse), the
shape (middle), and the shape's colour and texture (fine). Instances vary in position, scale, rotation,
aspect, colour and brightness, background, faint distractor strokes and pixel noise, so that telling
"red" from "orange" or "striped" from "solid" under that variation is genuinely harder than telling a
star from a circle.

Rendering uses PIL only for polygons and strokes (the anti-aliased shape mask is drawn at
``supersample`` times the size and box-reduced) and numpy for everything per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = ["COLOURS", "SHAPE_FAMILIES", "TEXTURES", "RenderStyle", "render_shape"]

# Coarse family -> its shapes (middle classes). Families differ in outline; shapes within one do too,
# but less (a 5-point from an 8-point star), and every shape looks different under any rotation.
SHAPE_FAMILIES: dict[str, tuple[str, ...]] = {
    "polygon": ("triangle", "square", "hexagon"),
    "round": ("circle", "ellipse", "crescent"),
    "star": ("star4", "star5", "star8"),
    "cross-arrow": ("plus", "arrow", "chevron"),
}

# Ordered in near pairs (red/orange, green/teal, blue/purple, yellow/pink): the first ``num_colours``
# are used, so the default four already contain two pairs that colour jitter makes non-trivial.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (215, 90, 35),
    "green": (50, 150, 60),
    "teal": (40, 145, 100),
    "blue": (45, 75, 205),
    "purple": (125, 55, 185),
    "yellow": (215, 195, 40),
    "pink": (230, 110, 170),
}

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checked", "hollow")

_DARK = 0.45  # brightness of the darker parts of a texture: same hue, so texture never changes the colour class


@dataclass(frozen=True)
class RenderStyle:
    """Instance variation of the renderer (all per image, drawn from the image's own generator).

    Attributes:
        scale_range: shape radius as a fraction of the image side.
        colour_jitter: std of the per-channel offset added to the shape colour (0-255 units).
        brightness_jitter: the shape colour is scaled by a factor in ``1 +- brightness_jitter``.
        noise_std: std of per-pixel noise (0-255 units; uniformly distributed).
        max_clutter: up to this many faint distractor strokes or blobs behind the shape.
        supersample: the shape mask is drawn this many times larger and reduced, for anti-aliasing.
    """

    scale_range: tuple[float, float] = (0.22, 0.40)
    colour_jitter: float = 12.0
    brightness_jitter: float = 0.12
    noise_std: float = 6.0
    max_clutter: int = 3
    supersample: int = 2


def _circle(n: int = 48, cx: float = 0.0, cy: float = 0.0, r: float = 1.0, aspect: float = 1.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + aspect * r * np.sin(t)], axis=1)


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    t = np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _plus(w: float) -> np.ndarray:
    flat = [-w, -1, w, -1, w, -w, 1, -w, 1, w, w, w, w, 1, -w, 1, -w, w, -1, w, -1, -w, -w, -w]
    return np.array(flat, dtype=np.float64).reshape(-1, 2)


@cache
def _shape_layers(shape: str) -> tuple[tuple[np.ndarray, int], ...]:
    """Unit-size polygons of a shape as ``(points (M, 2), fill)`` layers drawn in order (fill 0 cuts holes)."""
    a, w = 0.62, 0.3  # arrow head start, half-widths
    layers: dict[str, tuple[tuple[np.ndarray, int], ...]] = {
        "triangle": ((_regular(3, -np.pi / 2), 255),),
        "square": ((_regular(4, np.pi / 4), 255),),
        "hexagon": ((_regular(6), 255),),
        "circle": ((_circle(), 255),),
        "ellipse": ((_circle(aspect=0.55), 255),),
        "crescent": ((_circle(), 255), (_circle(cx=0.45, r=0.82), 0)),
        "star4": ((_star(4, 0.38), 255),),
        "star5": ((_star(5, 0.45), 255),),
        "star8": ((_star(8, 0.55), 255),),
        "plus": ((_plus(w), 255),),
        "arrow": ((np.array([[-1, -0.2], [0.1, -0.2], [0.1, -a], [1, 0], [0.1, a], [0.1, 0.2], [-1, 0.2]]), 255),),
        "chevron": ((np.array([[-0.7, -0.9], [-0.1, -0.9], [0.75, 0], [-0.1, 0.9], [-0.7, 0.9], [0.15, 0]]), 255),),
    }
    if shape not in layers:
        raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(layers)}")
    return tuple((pts.astype(np.float64), fill) for pts, fill in layers[shape])


@cache
def _coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates along one axis, in pixels."""
    return np.arange(size, dtype=np.float32) + np.float32(0.5)


def _plane(size: int, cx: float, cy: float, offset: float = 0.0) -> np.ndarray:
    """``offset + cx * x + cy * y`` over the pixel grid, ``(size, size)`` (an outer sum: one array op)."""
    c = _coords(size)
    return (np.float32(cy) * c)[:, None] + (np.float32(cx) * c + np.float32(offset))[None, :]


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform scalar; ``rng.random()`` is several times cheaper per call than ``rng.uniform(low, high)``."""
    return low + (high - low) * rng.random()


def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A tinted grey with a linear illumination ramp; returns the image and its mean colour."""
    base = (_u(rng, 60.0, 200.0) + rng.normal(0.0, 8.0, 3)).astype(np.float32)
    theta, amp = _u(rng, 0.0, 2 * np.pi), _u(rng, 0.0, 30.0)
    gx, gy = np.cos(theta) * amp / size, np.sin(theta) * amp / size
    ramp = _plane(size, gx, gy, -0.5 * (gx + gy) * size)  # zero at the image centre
    return ramp[:, :, None] + base, base


def _clutter(bg: np.ndarray, mean: np.ndarray, rng: np.random.Generator, max_items: int) -> np.ndarray:
    """Draw up to ``max_items`` faint lines, arcs or blobs onto the background."""
    count = int(rng.integers(0, max_items + 1))
    if count == 0:
        return bg
    size = bg.shape[0]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        alpha = _u(rng, 0.2, 0.45)  # faint: mostly background, a little of a random colour
        colour = tuple(int(v) for v in (1 - alpha) * mean + alpha * 255 * rng.random(3))
        kind = int(3 * rng.random())
        x0, y0, x1, y1 = (float(v) for v in size * rng.random(4))
        if kind == 0:
            draw.line([x0, y0, x1, y1], fill=colour, width=1 + int(2 * rng.random()))
        elif kind == 1:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
            draw.arc(box, _u(rng, 0, 360), _u(rng, 0, 360), fill=colour, width=1)
        else:
            r = _u(rng, 1.5, size / 12)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    return np.asarray(img, dtype=np.float32)


def _mask(shape: str, size: int, rng: np.random.Generator, style: RenderStyle, hollow: bool) -> np.ndarray:
    """Anti-aliased coverage of the shape in ``[0, 1]``, ``(size, size)``, at a random pose."""
    ss = style.supersample
    radius = _u(rng, *style.scale_range) * size
    margin = max(0.0, size / 2 - radius)
    centre = size / 2 + (1.6 * rng.random(2) - 0.8) * margin
    theta = _u(rng, 0.0, 2 * np.pi)
    stretch = np.array([_u(rng, 0.9, 1.1), 1.0])
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in _shape_layers(shape):
        xy = ((pts * stretch) @ rot * radius + centre) * ss
        draw.polygon(xy.ravel().tolist(), fill=fill)
    if ss > 1:
        canvas = canvas.reduce(ss)
    if hollow:  # keep a ring: the mask minus its erosion (repeated 3x3 minimum, much cheaper than one wide one)
        eroded = canvas
        for _ in range(max(2, round(radius * 0.15))):
            eroded = eroded.filter(ImageFilter.MinFilter(3))
        canvas = ImageChops.subtract(canvas, eroded)
    return np.asarray(canvas, dtype=np.float32) * np.float32(1.0 / 255.0)


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Per-pixel brightness factor in ``[_DARK, 1]`` for the shape's fill, or ``None`` for a uniform fill."""
    if texture in ("solid", "hollow"):
        return None
    theta = _u(rng, 0.0, np.pi)
    period = _u(rng, 5.0, 7.5) * size / 64
    cu, su = np.cos(theta) / period, np.sin(theta) / period
    fu = _plane(size, cu, su, rng.random())  # coordinates in texture periods
    if texture == "striped":
        on = (fu % 1.0) < 0.5
    else:
        fv = _plane(size, -su, cu, rng.random())
        if texture == "checked":
            on = (np.floor(fu) + np.floor(fv)) % 2 == 0
        elif texture == "dotted":
            on = ((fu % 1.0) - 0.5) ** 2 + ((fv % 1.0) - 0.5) ** 2 > 0.09
        else:
            raise ValueError(f"unknown texture {texture!r}; textures are {', '.join(TEXTURES)}")
    return np.where(on, np.float32(1.0), np.float32(_DARK))


def render_shape(
    shape: str,
    colour: tuple[int, int, int],
    texture: str,
    size: int,
    rng: np.random.Generator,
    style: RenderStyle = RenderStyle(),
) -> np.ndarray:
    """Render one instance as a ``(size, size, 3)`` uint8 array.

    Args:
        shape: one of the shapes in :data:`SHAPE_FAMILIES`.
        colour: the class's nominal RGB colour (jittered per instance).
        texture: one of :data:`TEXTURES`.
        size: image side in pixels.
        rng: the instance's own generator; the image is a pure function of its state.
        style: how much instances vary.
    """
    bg, mean = _background(size, rng)
    bg = _clutter(bg, mean, rng, style.max_clutter)
    alpha = _mask(shape, size, rng, style, hollow=texture == "hollow")[:, :, None]
    gain = 1.0 + _u(rng, -style.brightness_jitter, style.brightness_jitter)
    fill = (np.asarray(colour, dtype=np.float32) * gain + rng.normal(0.0, style.colour_jitter, 3)).astype(np.float32)
    shade = _texture(texture, size, rng)
    fg = fill[None, None, :] if shade is None else shade[:, :, None] * fill[None, None, :]
    img = bg + alpha * (fg - bg)
    if style.noise_std > 0:  # uniform noise with the requested std: 6x cheaper to draw than Gaussian
        img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(style.noise_std * 12**0.5)
    return np.clip(img, 0, 255).astype(np.uint8)
