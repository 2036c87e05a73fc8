"""``retrieval export``: export an encoder for deployment."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, user_errors


class ExportFormat(StrEnum):
    onnx = "onnx"


def export(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output file (e.g. query.onnx)."),
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format."),
    opset: int = typer.Option(18, help="ONNX opset version."),
    as_json: bool = typer.Option(False, "--json", help="Print the export summary as JSON."),
) -> None:
    """Export an encoder to ONNX (dynamic batch and image size), verified against PyTorch.

    The file's metadata carries the encoder id, embedding size and preprocessing, so
    `retrieval search --query-encoder FILE.onnx` and `retrieval serve` need nothing else.
    """
    with user_errors():
        from serving.export import export_onnx

        exported = export_onnx(encoder, out, opset=opset)
    summary = {
        "path": str(exported.path),
        "format": format.value,
        "exporter": exported.exporter,
        "min_cosine_vs_pytorch": exported.min_cosine,
    }
    if as_json:
        print_json(summary)
        return
    console.print(f"wrote {exported.path} (min cosine vs PyTorch at two image sizes: {exported.min_cosine:.6f})")
