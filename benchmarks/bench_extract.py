"""Extraction throughput: the full pipeline against the model alone on pre-decoded tensors, measured side by side.

Usage:
    python benchmarks/bench_extract.py [--backbone resnet10t] [--size 224] [--batch-size 64] [--workers 0,2]
                                       [--limit N] [--threads T] [--device cpu] [--repeats 3] [--chunk-size 128]

The pipeline is ``indexing.extract.extract_embeddings``: JPEG decode, resize and normalise in DataLoader
workers, then the forward pass, for each ``--workers`` value (worker start-up included, as it is in every real
run). The "index build" rows run ``extract_to_store``, what ``retrieval index build`` does: the same pipeline,
writing each chunk of ``--chunk-size`` embeddings to an fsynced file as it completes (the price of resuming).
The model-only rate feeds the same images, decoded and transformed beforehand with the same
``build_transforms``, to the same encoder at the same batch size on the same device. Their ratio, the pipeline
efficiency, says how much of the model's speed survives the input pipeline: near 1 the model is the
bottleneck, well below 1 decoding is, and more workers (or cores) would pay.

Images are the real JPEGs of ``../shared/data/clothing-small`` (beside the repository root) when present, else
the synthetic dataset written as JPEGs into a temporary folder. The encoder has random weights: throughput does
not depend on them. Every row is warmed up once, then the rows are timed in turn, ``--repeats`` rounds, and the
table reports each row's median (interleaving keeps a change in machine load from favouring one row).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLOTHING_SMALL = REPO_ROOT.parent / "shared" / "data" / "clothing-small"


def _dataset(workdir: Path, limit: int | None, size: int):
    """The benchmark images as a dataset of files on disk, and a line saying where they come from."""
    from retrieval.data.datasets import open_dataset

    if (CLOTHING_SMALL / "labels.csv").is_file():
        dataset, source = open_dataset(CLOTHING_SMALL), f"real JPEGs from {CLOTHING_SMALL}"
    else:
        from retrieval.data.synthetic import SyntheticConfig, split_classes, write_synthetic

        cfg = SyntheticConfig(image_size=max(size, 64), image_format="jpg")
        per_class = math.ceil((limit or 512) / len(split_classes(cfg, "train")))
        cfg = cfg.model_copy(update={"train_per_class": per_class})
        csv_path = write_synthetic(cfg, workdir / "synthetic", splits=("train",))["train"]
        dataset = open_dataset(csv_path)
        source = (
            f"NOTE: {CLOTHING_SMALL} not found; using SYNTHETIC {cfg.image_size} px JPEGs written to {csv_path.parent}"
        )
    if limit is not None:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    return dataset, source


def _interleaved_median_seconds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall time of each run, timed in turn round after round so that load drift hits every row alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet10t", help="backbone of the random encoder")
    parser.add_argument("--size", type=int, default=224, help="input size of the random encoder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the main process (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    parser.add_argument(
        "--chunk-size", type=int, default=128, help="images per chunk file in the resumable `index build` rows"
    )
    args = parser.parse_args()

    import torch

    from indexing.embedding_store import EmbeddingStore, ExtractionSpec
    from indexing.extract import extract_embeddings, extract_to_store
    from models import Encoder, EncoderConfig
    from models.devices import resolve_device
    from retrieval.data.gallery import Gallery
    from retrieval.data.transforms import PreprocessConfig, build_transforms

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    config = EncoderConfig(backbone=args.backbone, embedding_dim=128, preprocess=PreprocessConfig(input_size=args.size))
    encoder = Encoder(config).eval().to(device)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        dataset, source = _dataset(Path(tmp), args.limit, args.size)
        n = len(dataset)
        print(source)
        print(
            f"{n} images, {args.backbone} at {args.size} px, batch {args.batch_size}, device {device}, "
            f"{torch.get_num_threads()} torch threads, median of {args.repeats}"
        )

        # Model alone: the same images decoded and transformed up front, fed in the same batches.
        transform = build_transforms(config.preprocess, train=False)
        tensors = torch.stack([transform(dataset.load_image(i)) for i in range(n)])
        batches = list(tensors.split(args.batch_size))

        def model_only() -> None:
            with torch.inference_mode():
                for batch in batches:
                    encoder(batch.to(device)).float().cpu().numpy()
            sync()

        def pipeline(num_workers: int) -> Callable[[], None]:
            def run() -> None:
                extract_embeddings(
                    encoder, dataset, args.batch_size, device=device, num_workers=num_workers, progress=False
                )
                sync()

            return run

        gallery = Gallery.from_dataset(dataset, source)
        spec = ExtractionSpec(
            encoder_id=str(encoder.encoder_id),
            dim=encoder.embedding_dim,
            gallery_source=source,
            gallery_count=n,
            gallery_fingerprint=gallery.fingerprint(),
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
        )

        def resumable(num_workers: int) -> Callable[[], None]:
            """What `index build` runs: the same pipeline writing fsynced chunk files (a fresh store each time)."""

            def run() -> None:
                store_dir = Path(tmp) / "store"
                shutil.rmtree(store_dir, ignore_errors=True)
                store = EmbeddingStore.open_for(store_dir, spec)
                extract_to_store(encoder, gallery, store, device=device, num_workers=num_workers, progress=False)
                sync()

            return run

        runs = {"model only (tensors)": model_only}
        for w in workers:
            plural = "s" if w != 1 else ""
            runs[f"extract, {w} worker{plural}"] = pipeline(w)
            runs[f"index build, {w} worker{plural}"] = resumable(w)
        # Warm-up, once: first-call allocations, oneDNN/cuDNN algorithm choice, lazy imports of the decode path.
        # (DataLoader workers are fresh processes on every call, as in a real run, so there is nothing to keep warm.)
        with torch.inference_mode():
            encoder(batches[0].to(device))
        warm = dataset.subset(range(len(batches[0])))
        extract_embeddings(encoder, warm, args.batch_size, device=device, num_workers=0, progress=False)
        seconds = _interleaved_median_seconds(runs, args.repeats)

        model_rate = n / seconds["model only (tensors)"]
        print(f"{'':<26} {'img/s':>8} {'efficiency':>11}")
        for label, s in seconds.items():
            print(f"{label:<26} {n / s:>8.1f} {n / s / model_rate:>10.2f}x")


if __name__ == "__main__":
    main()
