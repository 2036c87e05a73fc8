"""Gallery extraction on Ray Data against the local pipeline, side by side on the same machine and images.

Usage:
    python benchmarks/bench_ray_extract.py [--images 64,2048] [--size 64] [--backbone resnet10t] [--dim 128]
                                           [--batch-size 64] [--chunk-size 256] [--cpus N] [--shapes 2x1,1x2]
                                           [--workers 0]

Both engines write a resumable extraction directory (``indexing.extract_job.extract_gallery`` locally,
``indexing.ray_extract.extract_gallery_ray`` on Ray) from the same synthetic JPEGs, with the quickstart
architecture by default (ResNet-10-T + GeM, 128-d, 64 px; random weights: speed does not depend on them).
The local engine runs PyTorch with torch's own thread count and ``--workers`` DataLoader workers; Ray runs CPU
actors in each of the ``--shapes`` (``AxT``: A actors of T cores and torch threads each, within
``ray.init(num_cpus=--cpus)``), each actor decoding and embedding its own batches.

Each engine runs once per ``--images`` size (smallest first). The Ray rows include what a real
``index build --engine ray`` pays on every run: starting the actors (process start, torch/torchvision imports,
encoder load); starting Ray itself is timed separately. The smallest size (one batch by default) is mostly that
fixed cost; the two extreme sizes give the steady rate ``(n2 - n1) / (t2 - t1)`` and the fixed cost
``t1 - n1 / rate``. On a shared machine the fit is only as good as the load is steady: the load (``uptime``) is
printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _gallery(workdir: Path, count: int, size: int):
    """``count`` synthetic JPEGs (the quickstart's generator) as a gallery of files on disk."""
    import math

    from retrieval.data.gallery import open_gallery
    from retrieval.data.synthetic import SyntheticConfig, split_classes, write_synthetic

    cfg = SyntheticConfig(image_size=max(size, 64), image_format="jpg")
    cfg = cfg.model_copy(update={"train_per_class": math.ceil(count / len(split_classes(cfg, "train")))})
    csv_path = write_synthetic(cfg, workdir / "synthetic", splits=("train",))["train"]
    lines = csv_path.read_text().splitlines()
    trimmed = csv_path.with_name(f"first-{count}.csv")
    trimmed.write_text("\n".join(lines[: count + 1]) + "\n")
    return open_gallery(trimmed)


def _rate_and_overhead(sizes: list[int], seconds: list[float]) -> tuple[float, float] | None:
    """Steady images/s and fixed seconds from the two extreme sizes (``None`` with a single size)."""
    if len(sizes) < 2 or seconds[-1] <= seconds[0]:
        return None  # a single size, or load noise larger than the work: no line to fit
    rate = (sizes[-1] - sizes[0]) / (seconds[-1] - seconds[0])
    return rate, seconds[0] - sizes[0] / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="64,2048", help="comma-separated gallery sizes")
    parser.add_argument("--size", type=int, default=64, help="input size of the random encoder")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="num_cpus given to ray.init")
    parser.add_argument("--shapes", default="2x1,1x2", help="comma-separated Ray actor pools: ACTORSxTHREADS")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the local engine")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.images.split(",") if s.strip()})
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",") if shape.strip()]

    import ray
    import torch

    from indexing.extract_job import ExtractOptions, extract_gallery
    from indexing.ray_extract import extract_gallery_ray
    from models import Encoder, EncoderConfig, save_encoder
    from retrieval.data.transforms import PreprocessConfig

    logging.basicConfig(level=logging.WARNING)
    print(f"before: {_uptime()}")
    torch.manual_seed(0)
    config = EncoderConfig(
        backbone=args.backbone,
        pooling="gem",
        embedding_dim=args.dim,
        preprocess=PreprocessConfig(input_size=args.size),
    )
    options = ExtractOptions(
        batch_size=args.batch_size, chunk_size=args.chunk_size, num_workers=args.workers, progress=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = root / "encoder"
        save_encoder(Encoder(config).eval(), checkpoint)
        from models.checkpoint import load_encoder

        encoder = load_encoder(checkpoint)
        galleries = {n: _gallery(root / f"g{n}", n, args.size) for n in sizes}
        print(
            f"{args.backbone} + GeM ({args.dim}-d) at {args.size} px, batch {args.batch_size}, chunks of "
            f"{args.chunk_size}; local: torch with {torch.get_num_threads()} threads, {args.workers} DataLoader "
            f"workers; ray: num_cpus={args.cpus}, CPU actor pools (actors x threads) {args.shapes}"
        )
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ray_init = time.perf_counter() - start
        seconds: dict[str, list[float]] = {"local": [], **{f"ray {a}x{t}": [] for a, t in shapes}}
        for n in sizes:
            gallery = galleries[n]
            start = time.perf_counter()
            extract_gallery(encoder, checkpoint, gallery, root / f"local{n}", options)
            seconds["local"].append(time.perf_counter() - start)
            for actors, threads in shapes:
                start = time.perf_counter()
                work = root / f"ray{n}-{actors}x{threads}"
                extract_gallery_ray(
                    encoder, checkpoint, gallery, work, options, num_actors=actors, cpus_per_actor=threads
                )
                seconds[f"ray {actors}x{threads}"].append(time.perf_counter() - start)
        ray.shutdown()

    print(f"\nray.init: {ray_init:.1f}s (paid once per `index build --engine ray` run, not in the rows below)")
    print(f"{'engine':<10} {'images':>7} {'seconds':>8} {'img/s':>7} {'speed vs local':>15}")
    for name, times in seconds.items():
        for n, took, local in zip(sizes, times, seconds["local"], strict=True):
            print(f"{name:<10} {n:>7} {took:>8.1f} {n / took:>7.1f} {local / took:>14.2f}x")
    for name, times in seconds.items():
        fitted = _rate_and_overhead(sizes, times)
        if fitted:
            print(f"{name:<10} steady {fitted[0]:.1f} img/s, fixed cost {fitted[1]:.1f}s (from the two extreme sizes)")
    print(f"after: {_uptime()}")


if __name__ == "__main__":
    main()
