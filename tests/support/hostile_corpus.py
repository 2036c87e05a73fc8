"""A seeded corpus of hostile requests for the search API: broken images, bombs, odd formats, bad forms and vectors.

Issue 12's outside probe sent 1,085 such uploads to a real server; this module regenerates a corpus of the
same kinds (and the odd-but-valid images the probe lacked) from a seed, in memory and in about a second, so
a test can replay it. Every case is one HTTP request; none may get a 5xx. Cases that the server should
accept (a 16-bit PNG, a CMYK JPEG, an animated GIF...) are in it too: a 200 is as good an answer as a 4xx.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["FORMATS", "Case", "bomb_png", "hostile_cases"]

#: Pillow format name -> (file suffix, MIME type).
FORMATS = {
    "JPEG": ("jpg", "image/jpeg"),
    "PNG": ("png", "image/png"),
    "WEBP": ("webp", "image/webp"),
    "GIF": ("gif", "image/gif"),
    "TIFF": ("tif", "image/tiff"),
    "BMP": ("bmp", "image/bmp"),
}
_TRUNCATIONS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_FLIPPED_PER_FORMAT = 115
_RANDOM_BLOBS = 160


@dataclass(frozen=True)
class Case:
    """One request: ``kind`` "search" (multipart ``parts`` + form ``data``), "embedding" (a JSON text) or "raw".

    Attributes:
        name: what the case is, unique in the corpus.
        group: "truncated", "bitflip", "random", "special", "bomb", "body", "form", "embedding" or "raw".
        kind: how to send it (see ``request_kwargs``).
        parts: multipart file parts ``(field, (filename, bytes, content type))``.
        data: multipart text fields.
        text: the JSON body of an embedding search, as text (so it may hold NaN or be invalid).
        raw: a raw body and its headers, posted to ``path``.
        path: the route.
    """

    name: str
    group: str
    kind: str = "search"
    parts: tuple = ()
    data: dict[str, str] = field(default_factory=dict)
    text: str = ""
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/search"

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client.post(self.path, **kwargs)``."""
        if self.kind == "search":
            return {"files": list(self.parts), "data": dict(self.data)}
        if self.kind == "embedding":
            return {"content": self.text.encode(), "headers": {"content-type": "application/json"}}
        return {"content": self.raw, "headers": dict(self.headers)}


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A black greyscale PNG declaring ``width`` x ``height``, compressed without ever being held decoded.

    Args:
        rows: how many rows of pixel data to actually include (default all); fewer makes a truncated bomb.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = height if rows is None else rows
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(compressor.compress(row * min(256, rows - start)) for start in range(0, rows, 256))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _photo(rng: np.random.Generator, width: int = 48, height: int = 40) -> Image.Image:
    pixels = np.clip(rng.normal(rng.integers(0, 255, 3), 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _upload(name: str, group: str, data: bytes, fmt: str = "PNG", form: dict[str, str] | None = None) -> Case:
    suffix, mime = FORMATS.get(fmt, ("bin", "application/octet-stream"))
    return Case(name, group, parts=(("image", (f"{name}.{suffix}", data, mime)),), data=form or {})


def _damaged(rng: np.random.Generator, originals: dict[str, bytes]) -> list[Case]:
    cases = []
    for fmt, data in originals.items():
        for fraction in _TRUNCATIONS:
            cases.append(_upload(f"truncated-{fmt}-{fraction}", "truncated", data[: int(len(data) * fraction)], fmt))
        for i in range(_FLIPPED_PER_FORMAT):
            flipped = bytearray(data)
            for position in rng.integers(0, len(data), int(rng.integers(1, 24))):
                flipped[position] ^= 1 << int(rng.integers(0, 8))
            cases.append(_upload(f"bitflip-{fmt}-{i}", "bitflip", bytes(flipped), fmt))
    return cases


def _random_blobs(rng: np.random.Generator, originals: dict[str, bytes]) -> list[Case]:
    magics = [data[:12] for data in originals.values()]
    cases = []
    for i in range(_RANDOM_BLOBS):
        blob = rng.integers(0, 256, int(rng.integers(1, 6000)), dtype=np.uint8).tobytes()
        if i % 2:  # half of them start like a real file, so a decoder gets past the format probe
            blob = magics[i % len(magics)] + blob
        cases.append(_upload(f"random-{i}", "random", blob, list(FORMATS)[i % len(FORMATS)]))
    return cases


def _specials(rng: np.random.Generator) -> list[Case]:
    """Odd but valid images: modes, depths, orientations, frames, extreme shapes."""
    photo = _photo(rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    sixteen = Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 27).astype(np.uint16))
    frames = [_photo(rng) for _ in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    items = {
        "16bit-png": (_encode(sixteen, "PNG"), "PNG"),
        "16bit-tiff": (_encode(sixteen, "TIFF"), "TIFF"),
        "cmyk-jpeg": (_encode(photo.convert("CMYK"), "JPEG"), "JPEG"),
        "cmyk-tiff": (_encode(photo.convert("CMYK"), "TIFF"), "TIFF"),
        "palette-png-transparent": (_encode(palette, "PNG"), "PNG"),
        "rgba-png": (_encode(photo.convert("RGBA"), "PNG"), "PNG"),
        "rgba-webp": (_encode(photo.convert("RGBA"), "WEBP"), "WEBP"),
        "la-png": (_encode(photo.convert("LA"), "PNG"), "PNG"),
        "grey-jpeg": (_encode(photo.convert("L"), "JPEG"), "JPEG"),
        "bilevel-png": (_encode(photo.convert("1"), "PNG"), "PNG"),
        "float-tiff": (_encode(photo.convert("F"), "TIFF"), "TIFF"),
        "int32-tiff": (_encode(photo.convert("I"), "TIFF"), "TIFF"),
        "exif-rotated-jpeg": (_encode(photo, "JPEG", exif=exif), "JPEG"),
        "progressive-jpeg": (_encode(photo, "JPEG", progressive=True), "JPEG"),
        "animated-gif": (animated.getvalue(), "GIF"),
        "multipage-tiff": (_encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "TIFF"),
        "20000x1-png": (_encode(Image.new("RGB", (20000, 1), (200, 10, 10)), "PNG"), "PNG"),
        "1x20000-png": (_encode(Image.new("RGB", (1, 20000), (10, 200, 10)), "PNG"), "PNG"),
    }
    for fmt in FORMATS:
        items[f"1x1-{fmt}"] = (_encode(Image.new("RGB", (1, 1), (9, 99, 199)), fmt), fmt)
    return [_upload(name, "special", data, fmt) for name, (data, fmt) in items.items()]


def _bombs() -> list[Case]:
    """Images whose header promises far more pixels than their bytes: refused or failed, never decoded in full."""
    gif = bytearray(_encode(Image.new("P", (2, 2)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen 65535 x 65535
    bmp = bytearray(_encode(Image.new("RGB", (2, 2)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 30000, 30000)
    return [
        _upload("bomb-png-13000x13000", "bomb", bomb_png(13000, 13000)),  # below Pillow's guard: ours must refuse
        _upload("bomb-png-13000x13000-truncated", "bomb", bomb_png(13000, 13000, rows=64)),
        _upload("bomb-png-100000x100000-header", "bomb", bomb_png(100000, 100000, rows=1)),
        _upload("bomb-png-7071x7071", "bomb", bomb_png(7071, 7071, rows=16)),  # just under 50 MP, truncated
        _upload("bomb-gif-65535-screen", "bomb", bytes(gif), "GIF"),
        _upload("bomb-bmp-30000x30000", "bomb", bytes(bmp), "BMP"),
    ]


def _forms(valid_png: bytes, max_upload_bytes: int) -> list[Case]:
    """Bad form values and multipart shapes around a valid image, and bodies over the size limit."""
    bad = {
        "k": ["0", "-1", "abc", "1.5", "", "99999999999999999999", "1e3", " 3", "nan"],
        "min_score": ["nan", "NaN", "inf", "-inf", "2", "-1.0001", "x", "", "1e400"],
        "granularity": ["", "x" * 65, "fine", "../../etc/passwd", "\x00", "coarse"],
    }
    cases = [
        _upload(f"form-{name}-{i}", "form", valid_png, form={name: value})
        for name, values in bad.items()
        for i, value in enumerate(values)
    ]
    cases.append(_upload("form-granularity-and-min-score", "form", valid_png, form={"granularity": "fine",
                                                                                    "min_score": "0.5"}))  # fmt: skip
    image = ("q.png", valid_png, "image/png")
    cases += [
        Case("form-two-images", "form", parts=(("image", image), ("image", image))),
        Case("form-no-image", "form", parts=(("other", image),)),
        Case("form-image-as-text", "form", data={"image": "not a file"}),
        Case("form-empty-image", "form", parts=(("image", ("e.png", b"", "image/png")),)),
        Case("form-no-filename", "form", parts=(("image", (None, valid_png, "image/png")),)),
        _upload("body-over-limit", "body", valid_png + bytes(max_upload_bytes)),
        _upload("body-at-limit-junk", "body", bytes(max_upload_bytes)),
    ]
    return cases


def _raw() -> list[Case]:
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    return [
        Case("raw-json-to-upload", "raw", kind="raw", raw=b'{"k": 3}', headers={"content-type": "application/json"}),
        Case("raw-empty", "raw", kind="raw", raw=b"", headers=multipart),
        Case("raw-no-boundary", "raw", kind="raw", raw=b"--xyz\r\n", headers={"content-type": "multipart/form-data"}),
        Case(
            "raw-unterminated",
            "raw",
            kind="raw",
            raw=b'--xyz\r\nContent-Disposition: form-data; name="image"',
            headers=multipart,
        ),
        Case("raw-binary", "raw", kind="raw", raw=bytes(range(256)) * 8, headers=multipart),
        Case("raw-text-plain", "raw", kind="raw", raw=b"hello", headers={"content-type": "text/plain"}),
    ]


def _embeddings(rng: np.random.Generator, dim: int, encoder_id: str) -> list[Case]:
    def case(name: str, body: Any) -> Case:
        text = body if isinstance(body, str) else json.dumps(body)  # json.dumps writes NaN/Infinity literals
        return Case(f"embedding-{name}", "embedding", kind="embedding", text=text, path="/v1/search/embedding")

    unit = rng.normal(size=dim)
    unit = (unit / np.linalg.norm(unit)).tolist()
    cases = [
        case("nan", {"embedding": [float("nan")] * dim, "encoder_id": encoder_id}),
        case("inf", {"embedding": [float("inf"), *unit[1:]], "encoder_id": encoder_id}),
        case("minus-inf", {"embedding": [*unit[:-1], float("-inf")], "encoder_id": encoder_id}),
        case("one-nan", {"embedding": [float("nan"), *unit[1:]], "encoder_id": encoder_id}),
        case("empty", {"embedding": [], "encoder_id": encoder_id}),
        case("huge-dim", {"embedding": [0.0] * 20000, "encoder_id": encoder_id}),
        case("not-unit", {"embedding": [1.0] * dim, "encoder_id": encoder_id}),
        case("zeros", {"embedding": [0.0] * dim, "encoder_id": encoder_id}),
        case("strings", {"embedding": ["a"] * dim, "encoder_id": encoder_id}),
        case("nested", {"embedding": [unit], "encoder_id": encoder_id}),
        case("no-encoder", {"embedding": unit}),
        case("foreign-encoder", {"embedding": unit, "encoder_id": "0" * 16}),
        case("extra-field", {"embedding": unit, "encoder_id": encoder_id, "path": "/etc/passwd"}),
        case("k-zero", {"embedding": unit, "encoder_id": encoder_id, "k": 0}),
        case("k-huge", {"embedding": unit, "encoder_id": encoder_id, "k": 10**12}),
        case("min-score-nan", {"embedding": unit, "encoder_id": encoder_id, "min_score": float("nan")}),
        case("min-score-inf", {"embedding": unit, "encoder_id": encoder_id, "min_score": float("inf")}),
        case("granularity-unknown", {"embedding": unit, "encoder_id": encoder_id, "granularity": "zzz"}),
        case("invalid-json", '{"embedding": [0.1, '),
        case("json-array", "[1, 2, 3]"),
        case("json-null", "null"),
        case("huge-number", '{"embedding": [1e999], "encoder_id": "x"}'),
    ]
    for wrong in sorted({1, 2, dim - 1, dim + 1, 2 * dim, 3, 7, 100, 512, 1000}):
        vector = rng.normal(size=wrong)
        cases.append(case(f"dim-{wrong}", {"embedding": (vector / np.linalg.norm(vector)).tolist(),
                                           "encoder_id": encoder_id}))  # fmt: skip
    return cases


def hostile_cases(seed: int = 0, dim: int = 32, encoder_id: str = "0123456789abcdef", max_upload_bytes: int = 2**20
                  ) -> list[Case]:  # fmt: skip
    """The corpus: at least 1,000 requests, the same for the same arguments.

    Args:
        seed: seeds every random choice (images, flipped bits, blobs, vectors).
        dim: the served index's dimension (vectors of other sizes are generated around it).
        encoder_id: the served encoder's id (so some vectors fail only on their values).
        max_upload_bytes: the server's upload limit (the oversize bodies just pass it).
    """
    rng = np.random.default_rng(seed)
    photo = _photo(rng)
    originals = {fmt: _encode(photo.convert("P") if fmt == "GIF" else photo, fmt) for fmt in FORMATS}
    cases = [
        *_bombs(),
        *_specials(rng),
        *_forms(originals["PNG"], max_upload_bytes),
        *_raw(),
        *_embeddings(rng, dim, encoder_id),
        *_damaged(rng, originals),
        *_random_blobs(rng, originals),
    ]
    assert len({case.name for case in cases}) == len(cases), "case names must be unique"
    return cases
