"""The mobile export: int8 (QDQ, per-channel, static) against its float32 graph -- size, latency, agreement.

Usage:
    python benchmarks/bench_mobile.py [--encoder CKPT] [--backbone resnet10t] [--size 224]
        [--images ../shared/data/clothing-small] [--calibration-count 100] [--agreement-count 200]
        [--repeats 50] [--threads 1] [--json]

Exports a checkpoint with ``serving.export_mobile.export_onnx_mobile`` (the same code as
``retrieval export --format onnx-mobile``) into a temporary folder and prints what it measured. Without
``--encoder`` it builds a quickstart-like encoder from random weights (the quickstart recipe's resnet10t,
GeM, 128-d, at ``--size``: the quickstart trains at 64 px, 224 is a common phone input); size and latency do
not depend on the weight values, agreement does (a trained encoder separates images more, random weights give
many near ties in the sample search).

Calibration and agreement use real photos: ``../shared/data/clothing-small`` when present (else ``--images``
must be given). The first ``--calibration-count`` images of a seeded shuffle calibrate; the next ones, up to
``--agreement-count``, are held out for the agreement check.

What is measured (ratios are int8 / float32, both the uint8-input graph at batch 1):
- size: the int8 ``.onnx`` against the float32 mobile graph;
- latency: ONNX Runtime CPU, same session options and ``--threads`` for both, 3 warm-up runs each, then
  ``--repeats`` runs interleaved (order rotated every repeat); medians;
- agreement on the held-out images: mean and min cosine between the two models' embeddings, and the mean
  top-10 overlap of a sample search (each image queries the others, gallery embedded by float32, query
  embedded by float32 vs by int8).
The header prints the machine: the numbers belong to it and its load at the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

CLOTHING_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing-small"


def _encoder(backbone: str, size: int, workdir: Path) -> Path:
    """A quickstart-like encoder with random weights, saved (an export needs its encoder id)."""
    import torch

    from models import Encoder, EncoderConfig, save_encoder
    from retrieval.data.preprocess import PreprocessConfig

    torch.manual_seed(0)
    config = EncoderConfig(backbone=backbone, embedding_dim=128, preprocess=PreprocessConfig(input_size=size))
    save_encoder(Encoder(config).eval(), workdir / "encoder")
    return workdir / "encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, help="checkpoint directory (default: a random quickstart-like one)")
    parser.add_argument("--backbone", default="resnet10t", help="backbone of the default encoder")
    parser.add_argument("--size", type=int, default=224, help="input side of the default encoder")
    parser.add_argument("--images", type=Path, help="calibration/agreement photos (default: clothing-small)")
    parser.add_argument("--calibration-count", type=int, default=100)
    parser.add_argument("--agreement-count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=50, help="timed batch-1 runs per model (median)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    images = args.images or CLOTHING_SMALL
    if not images.exists():
        parser.error(f"no calibration photos: {images} is absent; pass --images DIR|CSV")

    import onnxruntime as ort

    from serving.export_mobile import export_onnx_mobile

    with tempfile.TemporaryDirectory(prefix="bench-mobile-") as tmp:
        encoder = args.encoder or _encoder(args.backbone, args.size, Path(tmp))
        result = export_onnx_mobile(
            encoder,
            Path(tmp) / "mobile.onnx",
            images,
            calibration_count=args.calibration_count,
            agreement_count=args.agreement_count,
            latency_repeats=args.repeats,
            threads=args.threads,
        )
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "threads": args.threads,
        },
        "encoder": str(args.encoder) if args.encoder else f"random {args.backbone} at {args.size} px (128-d, GeM)",
        "images": str(images),
        **{key: value for key, value in result.as_dict().items() if key not in ("path", "ort_path", "skipped")},
        "skipped": len(result.skipped),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    machine = report["machine"]
    print(
        f"{machine['platform']} ({machine['processor']}), {machine['cpu_count']} CPU(s); onnxruntime "
        f"{machine['onnxruntime']}, {args.threads} thread(s)"
    )
    print(f"encoder: {report['encoder']}, input {result.input_size} px; photos: {images}")
    print(
        f"calibrated on {result.calibration_images} images, checked on {result.agreement_images} held-out "
        f"({len(result.skipped)} unreadable skipped)"
    )
    print()
    print(f"{'':<22} {'float32':>10} {'int8':>10} {'int8/fp32':>10}")
    print(
        f"{'size (MB)':<22} {result.fp32_bytes / 1e6:>10.2f} {result.int8_bytes / 1e6:>10.2f} "
        f"{result.size_ratio:>10.3f}"
    )
    print(f"{'latency b=1 (ms)':<22} {result.fp32_ms:>10.2f} {result.int8_ms:>10.2f} {result.latency_ratio:>10.3f}")
    print(f"{'.ort size (MB)':<22} {'':>10} {result.ort_bytes / 1e6:>10.2f}")
    print()
    print(
        f"agreement int8 vs float32: mean cosine {result.mean_cosine:.4f}, min {result.min_cosine:.4f}; "
        f"top-{result.k} overlap {result.top_k_overlap:.3f}"
    )


if __name__ == "__main__":
    main()
