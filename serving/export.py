"""Export a query encoder to a self-describing ONNX file, verified against PyTorch before it is kept.

The graph itself (tracing with dynamic batch, height and width, the exporter choice and its fallback, and
the parity check that ONNX Runtime reproduces PyTorch's embeddings to a minimum cosine of
``PARITY_THRESHOLD`` at two image sizes) is ``models.onnx_export``, shared with the gallery extraction of
``indexing``. What serving adds is what a file that travels alone needs: the query-encoder metadata
(``serving.onnx_metadata``) and a checksum. The file is written beside its target and renamed into place
only once verified, so a failed or interrupted export never leaves a half-written or wrong model at
``out_path``.

The written file carries its own SHA-256 in the ``file_sha256`` metadata property
(``serving.model_checksum``), sealed once the graph and the other metadata are final; runtimes verify
it on open, so a file damaged in transit fails with a message instead of answering wrongly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_THRESHOLD,
    Exporter,
    OnnxExportError,
    check_onnx_parity,
    export_verified_graph,
)
from serving.export_files import publish, staged_file
from serving.model_checksum import seal_file
from serving.onnx_metadata import OnnxMetadataError, encoder_metadata

if TYPE_CHECKING:
    from models.encoder import Encoder

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_THRESHOLD",
    "ExportError",
    "OnnxExport",
    "check_onnx_parity",
    "export_onnx",
    "seal_checksum",
]

logger = logging.getLogger(__name__)


class ExportError(OnnxExportError):
    """An export that failed or whose ONNX output does not match PyTorch (a ``models.onnx_export`` error too)."""


@dataclass(frozen=True)
class OnnxExport:
    """A written, verified export: where it is, how closely it matches PyTorch, which exporter made it."""

    path: Path
    min_cosine: float
    exporter: str


def export_onnx(
    encoder: Encoder | str | Path,
    out_path: str | Path,
    opset: int = 18,
    example_size: int | None = None,
    exporter: Exporter = "auto",
) -> OnnxExport:
    """Export ``encoder`` to ONNX with dynamic batch, height and width, and verify it.

    Args:
        encoder: an ``models.Encoder`` with an ``encoder_id`` (saved or loaded from a checkpoint), or the
            path of a checkpoint directory.
        out_path: the ``.onnx`` file to write (replaced atomically; parent folders are created).
        opset: ONNX opset version.
        example_size: image side used for tracing; defaults to the encoder's ``preprocess.input_size``.
        exporter: ``"dynamo"`` (torch.export), ``"torchscript"`` (legacy), or ``"auto"`` (dynamo, falling
            back to torchscript when tracing fails).

    Returns:
        The written path with the minimum PyTorch/ONNX Runtime cosine over the two parity checks (at the
        export size, batch 3, and at size + 32, batch 2).

    Raises:
        ExportError: the encoder has no id, the exporter failed, or the parity check failed; nothing is
            written at ``out_path`` then.
    """
    if isinstance(encoder, (str, Path)):
        from models.checkpoint import load_encoder

        encoder = load_encoder(encoder)
    try:
        metadata = encoder_metadata(encoder)
    except OnnxMetadataError as exc:
        raise ExportError(str(exc)) from exc
    out_path = Path(out_path)
    with staged_file(out_path, suffix=".onnx") as tmp:
        try:
            graph = export_verified_graph(
                encoder, tmp, metadata, opset=opset, example_size=example_size, exporter=exporter
            )
        except OnnxExportError as exc:
            raise ExportError(str(exc)) from exc
        seal_checksum(tmp)  # after the graph and metadata are final; the parity checked the same graph
        publish(tmp, out_path)
    logger.info(
        "exported encoder %s to %s (%s exporter, parity cosine %.6f)",
        metadata["encoder_id"],
        out_path,
        graph.exporter,
        graph.min_cosine,
    )
    return OnnxExport(path=out_path, min_cosine=graph.min_cosine, exporter=graph.exporter)


def seal_checksum(path: Path) -> str:
    """Seal a saved export whose ``file_sha256`` holds the placeholder (``serving.model_checksum``); return it.

    Raises:
        ExportError: the placeholder is not in the file exactly once (it was not written by ``encoder_metadata``).
    """
    try:
        return seal_file(path)
    except ValueError as exc:
        raise ExportError(f"cannot write the checksum of {path}: {exc}") from exc
