#!/usr/bin/env python3
"""The on-device query path in one file: embed a photo locally, send only the vector to the server.

This is what a phone app does with the mobile model (``retrieval export --format onnx-mobile``): decode
the photo, resize it, run the small int8 query encoder, and post the embedding to
``POST /v1/search/embedding`` together with the model's encoder id, so the server never sees the photo
and spends no compute on it. It needs only onnxruntime, Pillow and numpy (no torch, no project code),
so it runs on a laptop as it is:

    pip install onnxruntime pillow numpy
    python examples/query_client.py --model query-mobile.onnx --server http://127.0.0.1:8000 photo.jpg

Everything the client needs to prepare the image is read from the model's own metadata (input size,
resize policy, and for float models the normalisation), so the same script works with a plain
``--format onnx`` export too. The resize rule mirrors the engine's (``retrieval.data.preprocess``):
Pillow bilinear; ``squash`` to a square, or ``center_crop`` after resizing the shorter side.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image


class QueryModel:
    """An exported query encoder (``.onnx`` or ``.ort``) with the preprocessing its metadata describes."""

    def __init__(self, path: str | Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in ("encoder_id", "input_size", "resize") if key not in meta]
        if missing:
            raise SystemExit(f"{path} is not a retrieval-engine query model (metadata lacks {', '.join(missing)})")
        self.encoder_id = meta["encoder_id"]
        self.teacher_id = meta.get("teacher_id") or None  # a distilled student names the encoder it lands on
        self.input_size = int(meta["input_size"])
        self.resize = meta["resize"]
        self.input_format = meta.get("input_format", "float32_normalized")
        self.mean = np.asarray(json.loads(meta["mean"]), np.float32).reshape(3, 1, 1)
        self.std = np.asarray(json.loads(meta["std"]), np.float32).reshape(3, 1, 1)
        self.input_name = self.session.get_inputs()[0].name

    def _resized(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        size = self.input_size
        if self.resize == "squash":
            return image.resize((size, size), Image.Resampling.BILINEAR)
        width, height = image.size
        # the long side is int(size * long / short), the engine's arithmetic exactly
        new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        left, top = round((new_size[0] - size) / 2.0), round((new_size[1] - size) / 2.0)
        return image.crop((left, top, left + size, top + size))

    def embed(self, image: Image.Image) -> np.ndarray:
        """The photo's embedding: a ``(dim,)`` float32 unit vector."""
        pixels = np.asarray(self._resized(image), dtype=np.uint8).transpose(2, 0, 1)[None]
        if self.input_format == "uint8_rgb":
            batch = np.ascontiguousarray(pixels)
        else:
            batch = ((pixels.astype(np.float32) / np.float32(255.0)) - self.mean) / self.std
        vector = self.session.run(None, {self.input_name: batch})[0][0].astype(np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def search_by_embedding(
    server: str,
    vector: np.ndarray,
    encoder_id: str,
    teacher_id: str | None,
    k: int,
    granularity: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """POST the vector to ``/v1/search/embedding`` and return the decoded JSON answer.

    Raises:
        RuntimeError: the server answered with an error status; the message carries its ``detail``.
    """
    body: dict[str, Any] = {"embedding": [float(v) for v in vector], "encoder_id": encoder_id, "k": k}
    if teacher_id:
        body["teacher_id"] = teacher_id
    if granularity:
        body["granularity"] = granularity
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(
        server.rstrip("/") + "/v1/search/embedding", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(f"server answered {exc.code}: {detail}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Embed photos on this machine and search a retrieval server.")
    parser.add_argument("images", nargs="+", type=Path, help="photos to search with")
    parser.add_argument("--model", required=True, type=Path, help="the exported query model (.onnx or .ort)")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of `retrieval serve`")
    parser.add_argument("--k", type=int, default=5, help="hits per photo")
    parser.add_argument("--granularity", help="a calibrated level (fine, middle, coarse ...)")
    parser.add_argument("--api-key", help="the server's API key, if it has one (sent as X-API-Key)")
    parser.add_argument("--json", action="store_true", help="print the server's answers as JSON lines")
    args = parser.parse_args(argv)

    model = QueryModel(args.model)
    failed = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                vector = model.embed(image)
            answer = search_by_embedding(
                args.server, vector, model.encoder_id, model.teacher_id, args.k, args.granularity, args.api_key
            )
        except (OSError, RuntimeError) as exc:  # unreadable photo, server down, or an error answer
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps({"query": str(path), **answer}))
            continue
        print(f"{path}  ({answer['took_ms']:.1f} ms on the server)")
        for rank, hit in enumerate(answer["hits"], start=1):
            labels = " ".join(f"{level}={name}" for level, name in (hit.get("labels") or {}).items())
            print(f"  {rank:>3}. {hit['score']:.4f}  id={hit['id']}  {hit.get('path') or ''}  {labels}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
