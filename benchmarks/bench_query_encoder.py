"""Query-encoder latency: the ONNX Runtime export against the PyTorch checkpoint, measured side by side.

Usage:
    python benchmarks/bench_query_encoder.py --encoder CKPT [--onnx FILE.onnx] [--batch-sizes 1,8,32]

Without ``--encoder`` a random ``resnet10t`` at 64 px (the quickstart architecture) is built, saved and
exported into a temporary directory, so the script runs anywhere. Both runtimes embed the same PIL images
(decode excluded, preprocessing included) through the engine's own ``QueryEncoder`` interface; the table
reports the median latency per batch and the ONNX/PyTorch speed ratio from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _random_checkpoint(workdir: Path, backbone: str, size: int) -> Path:
    import torch

    from models import Encoder, EncoderConfig, save_encoder
    from retrieval.data.transforms import PreprocessConfig

    torch.manual_seed(0)
    config = EncoderConfig(backbone=backbone, embedding_dim=128, preprocess=PreprocessConfig(input_size=size))
    path = workdir / "encoder"
    save_encoder(Encoder(config).eval(), path)
    return path


def _median_seconds(encode, images: list[Image.Image], repeats: int) -> float:
    encode(images)  # warm-up: first-call allocations and graph optimisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, help="encoder checkpoint directory (default: a random resnet10t)")
    parser.add_argument("--onnx", type=Path, help="its ONNX export (default: exported now)")
    parser.add_argument("--backbone", default="resnet10t", help="backbone of the random encoder")
    parser.add_argument("--size", type=int, default=64, help="input size of the random encoder")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from serving.export import export_onnx
    from serving.runtimes import OnnxRuntimeQueryEncoder, TorchQueryEncoder

    with tempfile.TemporaryDirectory() as tmp:
        encoder_path = args.encoder or _random_checkpoint(Path(tmp), args.backbone, args.size)
        onnx_path = args.onnx or export_onnx(encoder_path, Path(tmp) / "encoder.onnx").path
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        torch_encoder = TorchQueryEncoder(encoder_path, device="cpu", batch_size=max(batch_sizes))
        onnx_encoder = OnnxRuntimeQueryEncoder(onnx_path, batch_size=max(batch_sizes))
        size = torch_encoder.preprocess.input_size
        rng = np.random.default_rng(0)
        print(f"encoder {encoder_path} ({size} px), ONNX {onnx_path}")
        print(f"{'batch':>5} {'torch ms':>10} {'onnx ms':>10} {'onnx speed-up':>14} {'max |diff|':>11}")
        for batch in batch_sizes:
            images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
            torch_s = _median_seconds(torch_encoder.encode, images, args.repeats)
            onnx_s = _median_seconds(onnx_encoder.encode, images, args.repeats)
            diff = np.abs(torch_encoder.encode(images) - onnx_encoder.encode(images)).max()
            print(f"{batch:>5} {1e3 * torch_s:>10.2f} {1e3 * onnx_s:>10.2f} {torch_s / onnx_s:>13.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
