"""Extraction throughput, PyTorch against ONNX Runtime: the full pipelines and the models alone, measured side by side.

Usage:
    python benchmarks/bench_extract.py [--backbone resnet10t] [--attention identity] [--dim 128] [--size 224]
                                       [--batch-size 64] [--workers 0,2] [--limit N] [--threads T] [--device cpu]
                                       [--repeats 3] [--chunk-size 128] [--runtimes torch,onnx]

The pipeline rows are ``indexing.extract.extract_embeddings``: JPEG decode, resize and normalise (in DataLoader
workers with ``--workers``), then the forward pass, for each ``--workers`` value (worker start-up included, as in
every real run). "torch" runs the encoder in PyTorch with the torch transforms; "onnx" is what
``retrieval index build --runtime onnx`` runs: the encoder exported to ONNX (``indexing.onnx_cache``; the export
time and its parity cosine are printed) in an ONNX Runtime CPU session, fed by a thread that decodes and
normalises with Pillow + numpy ahead of it (``indexing.onnx_embedder``). The "index build" rows run
``extract_to_store``, what ``retrieval index build`` does: the same pipeline, writing each chunk of
``--chunk-size`` embeddings to an fsynced file as it completes (the price of resuming). Both runtimes get the same
images, batch size, workers and ``--threads`` (torch's intra-op threads and ONNX Runtime's; default: each
library's own choice).

The model-only rows feed the same images, decoded and transformed beforehand, to each runtime at the same batch
size. Efficiency (pipeline / its own model alone) says how much of the model's speed survives the input pipeline;
the "onnx / torch" column is the speed-up of each ONNX Runtime row over the PyTorch row of the same kind. The
stage table times each step alone, per image, in this process (decode, resize, normalise; the torch steps with
torch's intra-op threads; the model from its row), so the shares say where each pipeline's time would go without
overlap; the measured pipeline time beside the sum shows what overlapping decode with the model saves.

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


def _per_image_ms(step: Callable[[int], object], count: int) -> float:
    """Milliseconds per image of ``step(i)`` over the first ``count`` images (after one warm-up call)."""
    step(0)
    start = time.perf_counter()
    for i in range(count):
        step(i)
    return (time.perf_counter() - start) * 1000 / count


def _stage_table(dataset, config, model_ms: dict[str, float], pipeline_ms: dict[str, float]) -> None:
    """Per-image time of each stage alone, and its share of each runtime's sequential sum."""
    import numpy as np
    import torch
    from torchvision.transforms import v2

    from indexing.onnx_embedder import normalise_batch
    from retrieval.data.preprocess import resize_for_model
    from retrieval.data.transforms import normalise_steps

    pre = config.preprocess
    count = min(len(dataset), 64)
    images = [dataset.load_image(i) for i in range(count)]
    resized = [resize_for_model(image, pre) for image in images]
    torch_normalise = v2.Compose(normalise_steps(pre))
    pixels = np.stack([np.asarray(r, dtype=np.uint8).transpose(2, 0, 1) for r in resized])
    decode = _per_image_ms(dataset.load_image, count)
    resize = _per_image_ms(lambda i: resize_for_model(images[i], pre), count)
    with torch.inference_mode():
        norm_torch = _per_image_ms(lambda i: torch_normalise(resized[i]), count)
    normalise_batch(pixels, pre)  # warm-up: the first call pays for page faults
    start = time.perf_counter()
    normalise_batch(pixels, pre)
    norm_numpy = (time.perf_counter() - start) * 1000 / count
    stages = {
        "torch": {"decode": decode, "resize": resize, "normalise (torch)": norm_torch, "model": model_ms["torch"]},
        "onnx": {"decode": decode, "resize": resize, "normalise (numpy)": norm_numpy, "model": model_ms.get("onnx")},
    }
    print(f"\nstages alone, ms per image ({count} images; model: from the model-only rows)")
    for runtime, parts in stages.items():
        if parts["model"] is None:
            continue
        total = sum(parts.values())
        shares = ", ".join(f"{name} {ms:.1f} ({ms / total:.0%})" for name, ms in parts.items())
        wall = pipeline_ms.get(runtime)
        measured = f"; pipeline measured {wall:.1f} ms/image" if wall else ""
        print(f"  {runtime:<5} sum {total:.1f} ms: {shares}{measured}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet10t", help="backbone of the random encoder")
    parser.add_argument("--attention", default="identity", help="attention of the random encoder (e.g. glam)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size of the random encoder")
    parser.add_argument("--size", type=int, default=224, help="input size of the random encoder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: theirs)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    parser.add_argument(
        "--chunk-size", type=int, default=128, help="images per chunk file in the resumable `index build` rows"
    )
    parser.add_argument("--runtimes", default="torch,onnx", help="comma-separated: torch, onnx")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or any(r not in ("torch", "onnx") for r in runtimes):
        parser.error(f"--runtimes takes torch and/or onnx, got {args.runtimes!r}")

    import torch

    from indexing.embedding_store import EmbeddingStore, ExtractionSpec
    from indexing.extract import extract_embeddings, extract_to_store
    from indexing.onnx_cache import gallery_onnx
    from indexing.onnx_embedder import OnnxGalleryEncoder
    from models import Encoder, EncoderConfig, save_encoder
    from models.devices import resolve_device
    from retrieval.data.gallery import Gallery
    from retrieval.data.transforms import PreprocessConfig, build_transforms
    from retrieval.threads import limit_compute_threads

    if args.threads:
        limit_compute_threads(args.threads)  # torch now, ONNX Runtime when its session opens
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    config = EncoderConfig(
        backbone=args.backbone,
        attention=args.attention,
        embedding_dim=args.dim,
        preprocess=PreprocessConfig(input_size=args.size),
    )
    encoder = Encoder(config).eval()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        save_encoder(encoder, Path(tmp) / "encoder")  # gives it an encoder id, as a real checkpoint has
        encoder = encoder.to(device)
        embedders: dict[str, OnnxGalleryEncoder | None] = {"torch": None}
        if "onnx" in runtimes:
            export = gallery_onnx(encoder, Path(tmp) / "onnx")
            print(
                f"ONNX export + parity check: {export.seconds:.1f}s ({export.exporter} exporter, "
                f"min cosine {export.min_cosine:.7f})"
            )
            embedders["onnx"] = OnnxGalleryEncoder(export.path, export.encoder_id, args.dim, config.preprocess)
        dataset, source = _dataset(Path(tmp), args.limit, args.size)
        n = len(dataset)
        print(source)
        attention = f" + {args.attention}" if args.attention != "identity" else ""
        print(
            f"{n} images, {args.backbone}{attention} ({args.dim}-d) at {args.size} px, batch {args.batch_size}, "
            f"torch on {device} with {torch.get_num_threads()} threads, ONNX Runtime on CPU with "
            f"{args.threads or 'its default'} threads, median of {args.repeats}"
        )

        # Models alone: the same images decoded and transformed up front, fed in the same batches.
        transform = build_transforms(config.preprocess, train=False)
        tensors = torch.stack([transform(dataset.load_image(i)) for i in range(n)])
        batches = list(tensors.split(args.batch_size))
        arrays = [batch.numpy() for batch in batches]

        def torch_model() -> None:
            with torch.inference_mode():
                for batch in batches:
                    encoder(batch.to(device)).float().cpu().numpy()
            sync()

        def onnx_model() -> None:
            for array in arrays:
                embedders["onnx"].embed(array)  # type: ignore[union-attr]

        def pipeline(runtime: str, num_workers: int) -> Callable[[], None]:
            def run() -> None:
                extract_embeddings(
                    encoder,
                    dataset,
                    args.batch_size,
                    device=device,
                    num_workers=num_workers,
                    progress=False,
                    embedder=embedders[runtime],
                )
                sync()

            return run

        gallery = Gallery.from_dataset(dataset, source)

        def resumable(runtime: str, num_workers: int) -> Callable[[], None]:
            """What `index build` runs: the same pipeline writing fsynced chunk files (a fresh store each time)."""
            spec = ExtractionSpec(
                encoder_id=str(encoder.encoder_id),
                dim=encoder.embedding_dim,
                gallery_source=source,
                gallery_count=n,
                gallery_fingerprint=gallery.fingerprint(),
                chunk_size=args.chunk_size,
                batch_size=args.batch_size,
                runtime=runtime,
            )

            def run() -> None:
                store_dir = Path(tmp) / "store"
                shutil.rmtree(store_dir, ignore_errors=True)
                store = EmbeddingStore.open_for(store_dir, spec)
                extract_to_store(
                    encoder,
                    gallery,
                    store,
                    device=device,
                    num_workers=num_workers,
                    progress=False,
                    embedder=embedders[runtime],
                )
                sync()

            return run

        models = {"torch": torch_model, "onnx": onnx_model}
        runs: dict[str, Callable[[], None]] = {f"model only, {r}": models[r] for r in runtimes}
        for w in workers:
            plural = "s" if w != 1 else ""
            for r in runtimes:
                runs[f"extract {r}, {w} worker{plural}"] = pipeline(r, w)
            for r in runtimes:
                runs[f"index build {r}, {w} worker{plural}"] = resumable(r, w)
        # Warm-up, once: first-call allocations, oneDNN/cuDNN algorithm choice, lazy imports of the decode path.
        # (DataLoader workers are fresh processes on every call, as in a real run, so there is nothing to keep warm.)
        with torch.inference_mode():
            encoder(batches[0].to(device))
        warm = dataset.subset(range(len(batches[0])))
        for r in runtimes:
            if r == "onnx":
                embedders["onnx"].embed(arrays[0])  # type: ignore[union-attr]
            extract_embeddings(
                encoder, warm, args.batch_size, device=device, num_workers=0, progress=False, embedder=embedders[r]
            )
        seconds = _interleaved_median_seconds(runs, args.repeats)

        print(f"{'':<30} {'img/s':>8} {'efficiency':>11} {'onnx / torch':>13}")
        for label, s in seconds.items():
            runtime = "onnx" if " onnx" in label else "torch"
            model_rate = n / seconds[f"model only, {runtime}"]
            twin = label.replace(" onnx", " torch")
            ratio = f"{seconds[twin] / s:>12.2f}x" if runtime == "onnx" and twin in seconds else ""
            print(f"{label:<30} {n / s:>8.3g} {n / s / model_rate:>10.2f}x {ratio}")  # 3 digits: 34.5, 0.412

        model_ms = {r: seconds[f"model only, {r}"] * 1000 / n for r in runtimes}
        first = f"{workers[0]} worker{'s' if workers[0] != 1 else ''}"
        pipeline_ms = {r: seconds[f"extract {r}, {first}"] * 1000 / n for r in runtimes}
        _stage_table(dataset, config, model_ms, pipeline_ms)


if __name__ == "__main__":
    main()
