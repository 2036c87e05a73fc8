"""The gallery encoder as an ONNX graph, exported once per extraction directory and reused when a run resumes.

``index build --runtime onnx`` runs the gallery encoder in ONNX Runtime (``indexing.onnx_embedder``). The
export (``models.onnx_export``: trace, then a parity check against PyTorch at two image sizes) takes seconds
for a small backbone and about a minute for GLAM-ResNet101 on CPU, so it is done once and kept in the
extraction directory beside the chunks: ``gallery-encoder.onnx`` and ``gallery-encoder.json``, the record of
what it was exported from (encoder id, the file's SHA-256, exporter, opset, parity cosine, library versions).

A run reuses the file when the record names the same encoder id (a content hash of the checkpoint's
weights, so a changed checkpoint has another id) and the file still has the recorded SHA-256 (a damaged or
replaced file is exported again), and when it was exported by the same torch and ONNX Runtime versions.
The graph is staged under a temporary name and renamed into place once verified; the record is written
after it, so a kill at any moment leaves either no reusable export or a complete, checked one.

This copy is private to one extraction: it carries no query-encoder metadata or checksum seal, and is not
a substitute for ``retrieval export`` (which writes the file a server or phone opens).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from indexing.index_dir import file_sha256
from retrieval.atomic import write_file_atomically
from retrieval.errors import UserFacingError

if TYPE_CHECKING:
    from models.encoder import Encoder

__all__ = [
    "GALLERY_ONNX",
    "GALLERY_ONNX_FORMAT",
    "GALLERY_ONNX_RECORD",
    "GalleryOnnx",
    "OnnxExtractionError",
    "gallery_onnx",
    "onnxruntime_missing",
]

logger = logging.getLogger(__name__)

GALLERY_ONNX = "gallery-encoder.onnx"
GALLERY_ONNX_RECORD = "gallery-encoder.json"
#: Value of the ``format`` property and record key; bump it when the graph's inputs/outputs change.
GALLERY_ONNX_FORMAT = "retrieval-gallery-encoder-onnx/1"
_OPSET = 18
_TORCH_HINT = "; extract with --runtime torch instead"


class OnnxExtractionError(UserFacingError, RuntimeError):
    """The gallery encoder cannot run in ONNX Runtime here; the message says why and names ``--runtime torch``."""


@dataclass(frozen=True)
class GalleryOnnx:
    """A verified ONNX export of a gallery encoder (the content of ``gallery-encoder.json``).

    Attributes:
        path: the ``.onnx`` file.
        encoder_id: the checkpoint it was exported from.
        sha256: the file's SHA-256.
        exporter: ``dynamo`` or ``torchscript``.
        min_cosine: the worst PyTorch/ONNX Runtime cosine of the parity check.
        versions: torch and onnxruntime versions that exported and checked it.
        seconds: how long the export and its check took.
        reused: found in the extraction directory rather than exported by this run.
    """

    path: Path
    encoder_id: str
    sha256: str
    exporter: str
    min_cosine: float
    versions: dict[str, str]
    seconds: float
    reused: bool = False


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime cannot be used in this environment (a missing package), or ``None`` when it can."""
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"{' and '.join(missing)} not installed (pip install onnx onnxruntime)"
    return None


def gallery_onnx(encoder: Encoder, work_dir: str | Path) -> GalleryOnnx:
    """The verified ONNX export of ``encoder`` in ``work_dir``: the one already there if valid, else a new one.

    Raises:
        OnnxExtractionError: ONNX Runtime is not installed, the encoder has no id, or it cannot be exported
            with parity (an operator the exporter does not know, a graph ONNX Runtime computes differently);
            the message names ``--runtime torch``.
    """
    problem = onnxruntime_missing()
    if problem is not None:
        raise OnnxExtractionError(f"--runtime onnx needs ONNX Runtime: {problem}{_TORCH_HINT}")
    if not getattr(encoder, "encoder_id", None):
        raise OnnxExtractionError("the encoder has no encoder_id (load it from a checkpoint)" + _TORCH_HINT)
    work_dir = Path(work_dir)
    cached = _reusable(work_dir, str(encoder.encoder_id))
    if cached is not None:
        logger.info("reusing the ONNX export of encoder %s in %s", cached.encoder_id, cached.path)
        return cached
    return _export(encoder, work_dir)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _export(encoder: Encoder, work_dir: Path) -> GalleryOnnx:
    """Export, verify, rename into place, then write the record (in that order: see the module docstring)."""
    from models.onnx_export import OnnxExportError, export_verified_graph

    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob(f".{GALLERY_ONNX}.tmp-*"):  # left by a run killed while exporting
        stale.unlink(missing_ok=True)
    target = work_dir / GALLERY_ONNX
    metadata = {
        "format": GALLERY_ONNX_FORMAT,
        "encoder_id": str(encoder.encoder_id),
        "embedding_dim": str(int(encoder.config.embedding_dim)),
        "encoder_config": encoder.config.model_dump_json(),
    }
    start = time.perf_counter()
    fd, name = tempfile.mkstemp(prefix=f".{GALLERY_ONNX}.tmp-", suffix=".onnx", dir=work_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            graph = export_verified_graph(encoder, tmp, metadata, opset=_OPSET)
        except OnnxExportError as exc:
            raise OnnxExtractionError(
                f"encoder {encoder.encoder_id} cannot run in ONNX Runtime: {exc}{_TORCH_HINT}"
            ) from exc
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    export = GalleryOnnx(
        path=target,
        encoder_id=str(encoder.encoder_id),
        sha256=file_sha256(target),
        exporter=graph.exporter,
        min_cosine=graph.min_cosine,
        versions=_versions(),
        seconds=time.perf_counter() - start,
    )
    record = {"format": GALLERY_ONNX_FORMAT, **asdict(export)}
    for runtime_only in ("path", "reused"):  # where it lies and whether it was reused are not facts of the file
        del record[runtime_only]
    write_file_atomically(work_dir / GALLERY_ONNX_RECORD, json.dumps(record, indent=2) + "\n")
    logger.info(
        "exported encoder %s to %s for ONNX Runtime in %.1fs (%s exporter, parity cosine %.6f)",
        export.encoder_id,
        target,
        export.seconds,
        export.exporter,
        export.min_cosine,
    )
    return export


def _reusable(work_dir: Path, encoder_id: str) -> GalleryOnnx | None:
    """The export recorded in ``work_dir`` if it is of ``encoder_id``, intact, and made by these versions."""
    record_file, target = work_dir / GALLERY_ONNX_RECORD, work_dir / GALLERY_ONNX
    if not record_file.is_file() or not target.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        export = GalleryOnnx(
            path=target,
            encoder_id=str(record["encoder_id"]),
            sha256=str(record["sha256"]),
            exporter=str(record["exporter"]),
            min_cosine=float(record["min_cosine"]),
            versions=dict(record["versions"]),
            seconds=float(record["seconds"]),
            reused=True,
        )
        fmt = record["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("exporting the encoder again: %s is unreadable (%s)", record_file, exc)
        return None
    why = None
    if fmt != GALLERY_ONNX_FORMAT:
        why = f"format {fmt!r}"
    elif export.encoder_id != encoder_id:
        why = f"it is of encoder {export.encoder_id}, not {encoder_id}"
    elif export.versions != _versions():
        why = f"it was exported by {export.versions}, this is {_versions()}"
    elif file_sha256(target) != export.sha256:
        why = f"{target.name} changed since it was exported (SHA-256 mismatch)"
    if why is not None:
        logger.info("exporting the encoder again instead of reusing %s: %s", target, why)
        return None
    return export
