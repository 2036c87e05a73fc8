"""GLAM's cost: parameters and CPU forward time of GLAM-ResNet101 against plain ResNet101-GeM, side by side.

Usage:
    python benchmarks/bench_glam.py [--size 512] [--repeats 5] [--threads 2] [--backbone resnet101]

Both encoders are built with random weights (``pretrained=False``), GeM pooling and a 512-d head, as in
the paper; GLAM has every branch on with its default reduction and kernel. Each repeat times one forward
of each model on the same ``1 x 3 x size x size`` batch, alternating the two so that a load change on the
machine hits both; the table reports the median after one warm-up forward each, and the GLAM/plain ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _encoder(backbone: str, attention: str, size: int) -> torch.nn.Module:
    from models import Encoder, EncoderConfig
    from retrieval.data.transforms import PreprocessConfig

    config = EncoderConfig(
        backbone=backbone, attention=attention, embedding_dim=512, preprocess=PreprocessConfig(input_size=size)
    )
    return Encoder(config).eval()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="side of the square input in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--backbone", default="resnet101", help="timm backbone of both encoders")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "plain": _encoder(args.backbone, "identity", args.size),
        "glam": _encoder(args.backbone, "glam", args.size),
    }
    images = torch.randn(1, 3, args.size, args.size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up: first-call allocations and kernel selection
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(_seconds(model, images))

    params = {name: _count(model) for name, model in models.items()}
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    glam_module = _count(models["glam"].attention)
    print(
        f"{args.backbone} at {args.size}x{args.size}, batch 1, {args.threads} thread(s), CPU, "
        f"median of {args.repeats} after 1 warm-up"
    )
    print(f"{'model':<24} {'params (M)':>11} {'forward ms':>11}")
    print(f"{args.backbone + '-GeM':<24} {params['plain'] / 1e6:>11.2f} {ms['plain']:>11.1f}")
    print(f"{'GLAM-' + args.backbone + '-GeM':<24} {params['glam'] / 1e6:>11.2f} {ms['glam']:>11.1f}")
    print(f"{'ratio GLAM / plain':<24} {params['glam'] / params['plain']:>10.3f}x {ms['glam'] / ms['plain']:>10.3f}x")
    print(f"GLAM module alone: {glam_module / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
