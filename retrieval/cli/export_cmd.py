"""``retrieval export``: export an encoder for deployment (ONNX float32/float16, mobile int8, TensorRT)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from retrieval.cli.common import console, print_json, user_errors


class ExportFormat(StrEnum):
    onnx = "onnx"
    onnx_mobile = "onnx-mobile"
    tensorrt = "tensorrt"


def export(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output file: query.onnx, mobile.onnx (+ mobile.ort), query.engine."),
    format: ExportFormat = typer.Option(
        ExportFormat.onnx,
        "--format",
        help="onnx: float model, dynamic batch and size; onnx-mobile: int8, uint8 RGB input, 1x3xSxS, plus .ort; "
        "tensorrt: a TensorRT engine for this GPU, with a .json sidecar.",
    ),
    fp16: bool = typer.Option(
        False, "--fp16", help="onnx/tensorrt: float16 weights, float32 inputs and outputs (for GPUs; slower on CPU)."
    ),
    calibration_images: Path | None = typer.Option(
        None,
        "--calibration-images",
        help="onnx-mobile: folder, CSV or path list of representative photos; some calibrate int8, others are held "
        "out to check it.",
    ),
    calibration_count: int = typer.Option(100, "--calibration-count", min=1, help="onnx-mobile: images to calibrate."),
    agreement_count: int = typer.Option(
        100, "--agreement-count", min=11, help="onnx-mobile: further held-out images for the agreement check."
    ),
    min_cosine: float = typer.Option(
        0.98, "--min-cosine", min=-1.0, max=1.0, help="onnx-mobile: fail below this mean int8/float32 cosine."
    ),
    min_overlap: float = typer.Option(
        0.8, "--min-overlap", min=0.0, max=1.0, help="onnx-mobile: fail below this mean top-10 overlap of a search."
    ),
    latency_repeats: int = typer.Option(20, "--latency-repeats", min=1, help="onnx-mobile: timed runs per model."),
    check_threads: int = typer.Option(
        1, "--check-threads", min=1, help="onnx-mobile: ONNX Runtime threads for the latency and agreement checks."
    ),
    min_batch: int = typer.Option(1, "--min-batch", min=1, help="tensorrt: smallest batch the engine accepts."),
    opt_batch: int = typer.Option(8, "--opt-batch", min=1, help="tensorrt: batch the engine is tuned for."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="tensorrt: largest batch the engine accepts."),
    opset: int = typer.Option(18, help="ONNX opset version."),
    as_json: bool = typer.Option(False, "--json", help="Print the export summary (with every number) as JSON."),
) -> None:
    """Export an encoder, verified before it is written (a failed check leaves nothing at --out).

    \b
    --format onnx       float32 ONNX, dynamic batch and image size, checked against PyTorch at two
                        sizes. --fp16: float16 weights with float32 inputs/outputs, for GPUs (CUDA or
                        TensorRT providers; on a CPU it is usually slower), checked against float32.
    --format onnx-mobile
                        a static 1x3xSxS model for phones taking the resized uint8 RGB image (the graph
                        normalises it), int8 by static QDQ quantisation calibrated on
                        --calibration-images, also saved in ORT format beside it (same stem, .ort).
                        Reports size, batch-1 latency and agreement with float32 on held-out images
                        (mean cosine, top-10 overlap of a sample search); fails below --min-cosine /
                        --min-overlap.
    --format tensorrt   a serialized TensorRT engine for this GPU (needs the tensorrt extra and an
                        NVIDIA GPU), batches --min-batch..--max-batch, checked against ONNX Runtime,
                        with X.engine.json describing the encoder and preprocessing.

    The model's metadata carries the encoder id, embedding size and preprocessing, so
    `retrieval search --query-encoder FILE` and `retrieval serve` need nothing else.
    """
    with user_errors():
        if format is not ExportFormat.onnx_mobile and calibration_images is not None:
            raise typer.BadParameter("--calibration-images applies to --format onnx-mobile only")
        if format is ExportFormat.onnx:
            summary = _export_onnx(encoder, out, fp16, opset)
        elif format is ExportFormat.onnx_mobile:
            if fp16:
                raise typer.BadParameter("--fp16 does not apply to --format onnx-mobile (it is int8)")
            if calibration_images is None:
                raise typer.BadParameter("--format onnx-mobile needs --calibration-images DIR|CSV (real photos)")
            from serving.export_mobile import export_onnx_mobile

            exported = export_onnx_mobile(
                encoder,
                out,
                calibration_images,
                calibration_count=calibration_count,
                agreement_count=agreement_count,
                min_cosine=min_cosine,
                min_overlap=min_overlap,
                latency_repeats=latency_repeats,
                threads=check_threads,
                opset=opset,
            )
            summary = {"format": format.value} | exported.as_dict()
        else:
            from serving.export_tensorrt import export_tensorrt

            built = export_tensorrt(encoder, out, fp16, min_batch, opt_batch, max_batch, opset)
            summary = {
                "format": format.value,
                "path": str(built.path),
                "sidecar": str(built.sidecar),
                "tensorrt_version": built.tensorrt_version,
                "precision": built.precision,
                "profile": built.profile,
                "min_cosine_onnx_vs_pytorch": built.onnx_min_cosine,
                "min_cosine_engine_vs_onnx": built.engine_min_cosine,
            }
    if as_json:
        print_json(summary)
        return
    _print_summary(summary)


def _export_onnx(encoder: Path, out: Path, fp16: bool, opset: int) -> dict[str, Any]:
    if not fp16:
        from serving.export import export_onnx

        exported = export_onnx(encoder, out, opset=opset)
        return {
            "format": "onnx",
            "precision": "fp32",
            "path": str(exported.path),
            "exporter": exported.exporter,
            "min_cosine_vs_pytorch": exported.min_cosine,
        }
    from serving.export_fp16 import export_onnx_fp16

    half = export_onnx_fp16(encoder, out, opset=opset)
    return {
        "format": "onnx",
        "precision": "fp16",
        "path": str(half.path),
        "exporter": half.exporter,
        "min_cosine_vs_pytorch": half.fp32_min_cosine,
        "min_cosine_fp16_vs_fp32": half.min_cosine,
        "verified_on": half.verified_on,
        "fp32_bytes": half.fp32_bytes,
        "fp16_bytes": half.fp16_bytes,
        "size_ratio": half.fp16_bytes / half.fp32_bytes,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    path = summary["path"]
    if summary["format"] == "onnx-mobile":
        _print_mobile(summary)
    elif summary["format"] == "tensorrt":
        profile = summary["profile"]
        console.print(
            f"wrote {path} and {summary['sidecar']} (TensorRT {summary['tensorrt_version']}, {summary['precision']}, "
            f"batches {profile['min'][0]}..{profile['max'][0]}, opt {profile['opt'][0]}); min cosine engine vs ONNX "
            f"{summary['min_cosine_engine_vs_onnx']:.6f}",
            highlight=False,
        )
    elif summary["precision"] == "fp16":
        console.print(
            f"wrote {path} (float16 weights, float32 I/O; {summary['fp16_bytes'] / 1e6:.1f} MB, "
            f"{summary['size_ratio']:.2f}x the float32 size); min cosine vs float32 "
            f"{summary['min_cosine_fp16_vs_fp32']:.6f} on {summary['verified_on']}, float32 vs PyTorch "
            f"{summary['min_cosine_vs_pytorch']:.6f}. float16 is meant for GPUs; on a CPU use the float32 export",
            highlight=False,
        )
    else:
        console.print(
            f"wrote {path} (min cosine vs PyTorch at two image sizes: {summary['min_cosine_vs_pytorch']:.6f})",
            highlight=False,
        )


def _print_mobile(s: dict[str, Any]) -> None:
    size = s["input_size"]
    lines = [
        f"wrote {s['path']} and {s['ort_path']} (int8 QDQ, input uint8 RGB 1x3x{size}x{size})",
        f"  size     float32 {s['fp32_bytes'] / 1e6:.2f} MB  int8 {s['int8_bytes'] / 1e6:.2f} MB  "
        f"(.ort {s['ort_bytes'] / 1e6:.2f} MB)  ratio {s['size_ratio']:.3f}",
        f"  latency  float32 {s['fp32_ms']:.2f} ms  int8 {s['int8_ms']:.2f} ms  ratio {s['latency_ratio']:.3f}  "
        f"(batch 1, ONNX Runtime CPU, {s['threads']} thread(s), median of {s['latency_repeats']})",
        f"  agreement on {s['agreement_images']} held-out images (calibrated on {s['calibration_images']}): "
        f"mean cosine {s['mean_cosine']:.4f} (min {s['min_cosine']:.4f}, floor {s['thresholds']['min_cosine']}), "
        f"top-{s['k']} overlap {s['top_k_overlap']:.3f} (floor {s['thresholds']['min_overlap']})",
    ]
    if s["skipped"]:
        lines.append(
            f"  skipped {len(s['skipped'])} unreadable image(s), e.g. {s['skipped'][0][0]}: {s['skipped'][0][1]}"
        )
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
