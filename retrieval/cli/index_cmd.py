"""``retrieval index build|merge|add``: embed a gallery into an index directory, combine shards, grow an index.

Extraction is chunked and resumable: embeddings go to an extraction directory (``OUT.extract`` for a
build) one chunk file at a time, so rerunning an interrupted command continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from retrieval.cli.backend_options import (
    backend_option,
    collection_option,
    new_index_backend,
    qdrant_url_option,
)
from retrieval.cli.common import console, fail, print_json, user_errors
from retrieval.cli.index_inspect_cmd import print_calibration

GALLERY_HELP = (
    "Gallery: an image folder (class = first sub-folder), a CSV ('path' column, optional fine/middle/coarse "
    "label columns, any other columns kept as metadata), or a text file of paths (one per line)."
)
FACTORY_HELP = (
    "FAISS index factory string (Flat = exact search; HNSW32; IVF1024,Flat; IVF4096_HNSW32,PQ128x4fs,RFlat; "
    "...,Refine(SQ8); IVF4096,PQ64 ...) or 'auto': chosen from the gallery size and --memory-budget (exact Flat "
    "below 50k images; see docs/index_types.md)."
)


WHITEN_HELP = (
    "Whiten the descriptors: a linear map fitted once, stored with the index (whitening.safetensors) and applied "
    "to the gallery and to every query. 'pca': centring + PCA whitening, unsupervised, any gallery. 'learned': "
    "Radenovic et al.'s learned whitening from pairs of images of the same fine class (needs labels). Use it "
    "when scores crowd together (e.g. every cosine above 0.9, typical of an encoder on images unlike its "
    "training data): it spreads them and usually improves the ranking; measure with and without. "
    "See docs/whitening.md."
)


def _whiten_option() -> Any:
    return typer.Option(None, "--whiten", metavar="pca|learned", help=WHITEN_HELP)


def _whiten_dim_option() -> Any:
    return typer.Option(
        None,
        "--whiten-dim",
        min=1,
        help="Dimension after whitening (default: every direction the fitting vectors span, at most the "
        "encoder's; a gallery of n images spans at most n - 1). Smaller drops the weakest directions.",
    )


def _whiten_images_option() -> Any:
    return typer.Option(
        None,
        "--whiten-images",
        help="Fit the whitening on these images (CSV, folder or list; labelled for 'learned': its finest level "
        "defines the matching pairs) instead of the gallery, e.g. a labelled validation set.",
    )


def _calibrate_option() -> Any:
    return typer.Option(
        None,
        "--calibrate",
        help="Labelled validation images (CSV with 'path' + the index's level columns): calibrate the granularity "
        "thresholds right after writing the index, as `retrieval index calibrate` would.",
    )


def _objective_option() -> Any:
    return typer.Option("f1", "--objective", help="Calibration objective with --calibrate: 'f1' or 'precision>=P'.")


RUNTIME_HELP = (
    "What runs the encoder while extracting. 'torch': PyTorch on --device. 'onnx': the encoder is exported to "
    "ONNX once (checked against PyTorch: cosine >= 0.9999; kept in the extraction directory and reused on resume) "
    "and run by ONNX Runtime on the CPU, about twice PyTorch's images/s there; honours --threads. 'auto': torch "
    "when a CUDA device is used, else onnx when ONNX Runtime is installed and there are at least 256 images to "
    "embed (fewer do not repay the export), else torch; an interrupted extraction continues with the runtime "
    "it started with."
)


def _runtime_option() -> Any:
    return typer.Option("auto", "--runtime", metavar="auto|onnx|torch", help=RUNTIME_HELP)


def _device_option() -> Any:
    return typer.Option("auto", help="Torch device for extraction: auto (CUDA when visible), cpu, cuda, cuda:N.")


def _amp_option() -> Any:
    return typer.Option(True, "--amp/--no-amp", help="float16 autocast when extracting on CUDA.")


def _factory_option() -> Any:
    return typer.Option("auto", help=FACTORY_HELP)


def _budget_option() -> Any:
    return typer.Option(
        None,
        "--memory-budget",
        help="Memory the index may take with --factory auto, e.g. 2GB, 500MB, 512MiB "
        "(default: half of this machine's RAM).",
    )


def _recall_option() -> Any:
    return typer.Option(
        0.95, "--target-recall", help="Recall@10 that an approximate index's nprobe/efSearch are tuned to reach."
    )


def build(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory that embeds the gallery."),
    images: Path = typer.Option(..., "--images", help=GALLERY_HELP),
    out: Path = typer.Option(
        ..., "--out", help="Index directory to write (replaced atomically), or with --shard the shard's directory."
    ),
    factory: str = _factory_option(),
    memory_budget: str | None = _budget_option(),
    target_recall: float = _recall_option(),
    whiten: str | None = _whiten_option(),
    whiten_dim: int | None = _whiten_dim_option(),
    whiten_images: Path | None = _whiten_images_option(),
    calibrate: Path | None = _calibrate_option(),
    objective: str = _objective_option(),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="Embed only slice I of N (I counts from 0, e.g. 0/4 .. 3/4) into --out; "
        "combine the N directories with `retrieval index merge`.",
    ),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (resume with the same value)."),
    chunk_size: int = typer.Option(
        2048, min=1, help="Images per chunk file: the unit of resuming and of sharding (every shard: the same value)."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Where the chunk files go while building (default: OUT.extract beside the index)."
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Discard chunk files left by a different job instead of refusing to continue."
    ),
    keep_embeddings: bool = typer.Option(
        False, "--keep-embeddings", help="Keep the chunk files after a successful build (default: removed)."
    ),
    device: str = _device_option(),
    runtime: str = _runtime_option(),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images while the model runs."),
    amp: bool = _amp_option(),
    backend: str = backend_option(),
    qdrant_url: str | None = qdrant_url_option(),
    collection: str | None = collection_option(),
    engine: str = typer.Option(
        "local",
        "--engine",
        metavar="local|ray",
        help="What runs the extraction: 'local' (this process) or 'ray' (Ray Data: an actor pool of encoders over "
        "the Ray cluster `ray.init` reaches, GPU actors where there are GPUs; `pip install "
        '"retrieval-engine[distributed]"`). Both write the same chunk files and build the same index.',
    ),
    actors: int | None = typer.Option(
        None, "--actors", min=1, help="Encoder actors with --engine ray (default: one per GPU, else one per CPU core)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Embed every gallery image and write an index directory (manifest, vector index, SQLite metadata).

    Embeddings are written in chunk files as they are produced: if the run is interrupted (Ctrl-C, kill,
    crash), run the same command again and it continues where it stopped, giving the same index.
    Corrupt or unreadable images are skipped and listed in OUT/skipped.tsv; the build goes on and
    the summary counts them. The index type and why it was chosen are printed and recorded in the
    manifest; an approximate index has its search parameter (nprobe, efSearch) tuned to
    --target-recall on a sample of the gallery, stored as its default. With --whiten, a whitening is
    fitted after the extraction and the index stores whitened vectors; queries are whitened the same way
    at search time. With --calibrate, the granularity thresholds are calibrated on labelled validation
    images right after (whitened like the queries). With --backend qdrant the vectors go to a Qdrant
    collection instead of index.faiss; with --engine ray the extraction runs on Ray Data.
    """
    with user_errors():
        from indexing.builder import build_index, check_engine
        from indexing.embedding_store import parse_shard
        from indexing.extract_job import ExtractOptions, default_work_dir, extract_shard
        from retrieval.data.gallery import open_gallery

        _check_calibration_options(calibrate, objective)
        _check_runtime(runtime)
        check_engine(engine)
        backend, backend_options = new_index_backend(backend, qdrant_url, collection, out)
        gallery = open_gallery(images)
        if shard is not None:
            if whiten is not None or whiten_dim is not None or whiten_images is not None:
                raise fail(
                    "--whiten is fitted when the index is written, on the whole gallery: pass it to "
                    "`retrieval index merge` instead of `index build --shard`"
                )
            if backend_options or engine != "local":
                raise fail(
                    "--shard only extracts; give --backend to `retrieval index merge`, and use --engine ray "
                    "instead of shards, not with them"
                )
            try:
                slice_ = parse_shard(shard)
            except ValueError as exc:
                raise fail(str(exc)) from None
            options = ExtractOptions(batch_size, chunk_size, device, workers, amp, not as_json, restart, runtime)
            with _resume_hint(out):
                run = extract_shard(encoder, gallery, out, slice_, options)
            _print_shard(out, slice_, run, as_json)
            return
        with _resume_hint(work_dir or default_work_dir(out)):
            extraction = _extraction_kwargs(
                batch_size, chunk_size, device, workers, amp, as_json, work_dir, restart, keep_embeddings, runtime
            )
            summary = build_index(
                encoder,
                gallery,
                out,
                factory=factory,
                memory_budget=memory_budget,
                target_recall=target_recall,
                whiten=whiten,
                whiten_dim=whiten_dim,
                whiten_images=whiten_images,
                backend=backend,
                backend_options=backend_options,
                engine=engine,
                actors=actors,
                **extraction,
            )
        calibration = _calibrate(out, calibrate, objective, batch_size, device, workers, as_json)
    _print_build(summary, out, as_json, calibration)


def merge(
    shards: list[Path] = typer.Argument(..., help="The directories written by `index build --shard I/N`, all N."),
    out: Path = typer.Option(..., "--out", help="Index directory to write (replaced atomically if it exists)."),
    factory: str = _factory_option(),
    memory_budget: str | None = _budget_option(),
    target_recall: float = _recall_option(),
    whiten: str | None = _whiten_option(),
    whiten_dim: int | None = _whiten_dim_option(),
    whiten_images: Path | None = _whiten_images_option(),
    calibrate: Path | None = _calibrate_option(),
    objective: str = _objective_option(),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Default query encoder to record (default: the checkpoint that embedded the shards)."
    ),
    device: str = _device_option(),
    backend: str = backend_option(),
    qdrant_url: str | None = qdrant_url_option(),
    collection: str | None = collection_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Combine the shard directories of `index build --shard I/N` runs into one index.

    The shards must come from the same encoder, gallery and --chunk-size and cover every slice once;
    the index is then the one a single `index build` would write. --whiten is fitted here, on the
    merged gallery (or --whiten-images, embedded with the shards' encoder on --device).
    """
    with user_errors():
        from indexing.builder import merge_shards

        _check_calibration_options(calibrate, objective)
        backend, backend_options = new_index_backend(backend, qdrant_url, collection, out)
        summary = merge_shards(
            list(shards),
            out,
            factory,
            memory_budget,
            target_recall,
            encoder_path=encoder,
            whiten=whiten,
            whiten_dim=whiten_dim,
            whiten_images=whiten_images,
            device=device,
            progress=not as_json,
            backend=backend,
            backend_options=backend_options,
        )
        calibration = _calibrate(out, calibrate, objective, 64, "auto", 0, as_json)
    _print_build(summary, out, as_json, calibration)


def add(
    index: Path = typer.Argument(..., help="Index directory to extend (replaced atomically when done)."),
    images: Path = typer.Option(..., "--images", help=GALLERY_HELP),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Encoder checkpoint; default: the one that built the index (ids must match)."
    ),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (resume with the same value)."),
    chunk_size: int = typer.Option(2048, min=1, help="Images per chunk file (the unit of resuming)."),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Where the chunk files go (default: INDEX.add-extract beside the index)."
    ),
    restart: bool = typer.Option(False, "--restart", help="Discard chunk files left by a different job."),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="Keep the chunk files afterwards."),
    device: str = _device_option(),
    runtime: str = _runtime_option(),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images."),
    amp: bool = _amp_option(),
    backend: str | None = backend_option(None),
    qdrant_url: str | None = qdrant_url_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Embed more images and append them to an index: ids continue after the largest one.

    The index's encoder embeds them (another encoder is refused), an IVF index keeps its trained
    centroids, and manifest, metadata and skipped.tsv are updated together in one atomic replace.
    Interrupted, it continues from its chunk files when run again.
    """
    with user_errors():
        from indexing.append import add_to_index
        from indexing.extract_job import default_work_dir
        from indexing.index_dir import backend_overrides
        from retrieval.data.gallery import open_gallery

        _check_runtime(runtime)
        backend_options = backend_overrides(index, backend, qdrant_url)
        gallery = open_gallery(images)
        with _resume_hint(work_dir or default_work_dir(index, "add-extract")):
            extraction = _extraction_kwargs(
                batch_size, chunk_size, device, workers, amp, as_json, work_dir, restart, keep_embeddings, runtime
            )
            summary = add_to_index(index, gallery, encoder, backend_options=backend_options, **extraction)
    result = {
        "index": str(index),
        "added": summary.added,
        "skipped": len(summary.skipped),
        "first_id": summary.first_id,
        "count": summary.count,
        "seconds": round(summary.seconds, 2),
        "images_per_second": round(summary.extraction.images_per_second, 1),
        "runtime": summary.extraction.runtime,
        "runtime_reason": summary.extraction.runtime_reason,
        "whitening": summary.whitening,
    }
    if as_json:
        print_json(result)
        return
    whitened = f", whitened with the index's {summary.whitening} whitening" if summary.whitening else ""
    console.print(
        f"added {summary.added} images to {index} (ids from {summary.first_id}{whitened}); it now holds "
        f"{summary.count} ({summary.seconds:.1f}s, {summary.extraction.images_per_second:.1f} img/s)",
        highlight=False,
    )
    _print_runtime(summary.extraction)
    _print_skipped(len(summary.skipped), index)


def _check_runtime(runtime: str) -> None:
    """A bad --runtime fails before the gallery is opened, with the valid names."""
    from indexing.extract_job import RUNTIMES

    if runtime not in RUNTIMES:
        raise fail(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def _print_runtime(run: Any) -> None:
    if run is not None and run.runtime_reason:
        console.print(f"extraction runtime {run.runtime}: {run.runtime_reason}", highlight=False)


def _check_calibration_options(labels: Path | None, objective: str) -> None:
    """A missing labels file or a bad objective fails before the (long) build, not after it."""
    from indexing.calibration import parse_objective

    if labels is None:
        return
    if not labels.exists():
        raise fail(f"--calibrate: validation labels not found: {labels}")
    try:
        parse_objective(objective)
    except ValueError as exc:
        raise fail(f"--objective: {exc}") from None


def _calibrate(
    index: Path, labels: Path | None, objective: str, batch_size: int, device: str, workers: int, as_json: bool
) -> Any:
    if labels is None:
        return None
    from indexing.calibrate_index import calibrate_index

    return calibrate_index(
        index, labels, objective, batch_size=batch_size, device=device, num_workers=workers, progress=not as_json
    )


def _extraction_kwargs(
    batch_size: int,
    chunk_size: int,
    device: str,
    workers: int,
    amp: bool,
    as_json: bool,
    work_dir: Path | None,
    restart: bool,
    keep_embeddings: bool,
    runtime: str,
) -> dict[str, Any]:
    """The extraction options ``build_index`` and ``add_to_index`` share, from the command's flags."""
    return {
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "device": device,
        "num_workers": workers,
        "amp": amp,
        "progress": not as_json,
        "work_dir": work_dir,
        "restart": restart,
        "keep_embeddings": keep_embeddings,
        "runtime": runtime,
    }


@contextmanager
def _resume_hint(work_dir: Path) -> Iterator[None]:
    """On Ctrl-C, say where the finished chunks are and how to continue (instead of a bare 'interrupted')."""
    try:
        yield
    except KeyboardInterrupt:
        raise fail(
            f"interrupted; the finished chunks are kept in {work_dir}: run the same command again to continue",
            code=130,
        ) from None


def _print_shard(out: Path, shard: tuple[int, int], run: Any, as_json: bool) -> None:
    result = {
        "shard": f"{shard[0]}/{shard[1]}",
        "out": str(out),
        "chunks_resumed": run.chunks_before,
        "chunks_written": run.chunks_written,
        "embedded": run.images_embedded,
        "skipped": run.images_skipped,
        "seconds": round(run.seconds, 2),
        "images_per_second": round(run.images_per_second, 1),
        "runtime": run.runtime,
        "runtime_reason": run.runtime_reason,
    }
    if as_json:
        print_json(result)
        return
    _print_runtime(run)
    console.print(
        f"shard {shard[0]}/{shard[1]}: embedded {run.images_embedded} images into {out} "
        f"({run.images_skipped} skipped, {run.chunks_before} chunks resumed, {run.images_per_second:.1f} img/s)",
        highlight=False,
    )
    console.print(f"when every shard is done: retrieval index merge DIR_0 ... DIR_{shard[1] - 1} --out INDEX")


def _print_build(summary: Any, out: Path, as_json: bool, calibration: Any = None) -> None:
    run = summary.extraction
    result = {
        "index": str(out),
        "images": summary.images,
        "count": summary.count,
        "skipped": len(summary.skipped),
        "seconds": round(summary.seconds, 2),
        "chunks_resumed": run.chunks_before if run else None,
        "images_per_second": round(run.images_per_second, 1) if run else None,
        "runtime": run.runtime if run else None,
        "runtime_reason": run.runtime_reason if run else None,
        "factory": summary.factory,
        "factory_reason": summary.factory_reason,
        "search_params": summary.search_params,
        "tuning": summary.tuning,
        "whitening": summary.whitening,
        "thresholds": calibration.calibration.thresholds if calibration else None,
        "calibration_warnings": [w.to_dict() for w in calibration.calibration.warnings] if calibration else None,
        "calibration_plot": str(calibration.plot) if calibration and calibration.plot else None,
    }
    if as_json:
        print_json(result)
        return
    resumed = f", resumed from {run.chunks_before} finished chunks" if run and run.chunks_before else ""
    speed = f", extraction {run.images_per_second:.1f} img/s" if run else ""
    console.print(
        f"indexed {summary.count} of {summary.images} images into {out} in {summary.seconds:.1f}s{speed}{resumed}",
        highlight=False,
    )
    _print_runtime(run)
    console.print(f"index type {summary.factory}: {summary.factory_reason}", highlight=False)
    if summary.whitening is not None:
        console.print(_whitening_line(summary.whitening), highlight=False, soft_wrap=True)
    if summary.tuning is not None:
        tuning = summary.tuning
        params = ", ".join(f"{k}={v}" for k, v in (summary.search_params or {}).items()) or "no search parameter"
        verdict = "reaches" if tuning["reached"] else "[yellow]falls short of[/]"
        console.print(
            f"tuned {params}: recall@{tuning['k']} {tuning['recall']:.3f} {verdict} the target "
            f"{tuning['target_recall']:.3f} on {tuning['num_queries']} gallery queries",
            highlight=False,
        )
    _print_skipped(len(summary.skipped), out)
    if calibration is not None:
        print_calibration(calibration, out)


def _whitening_line(whitening: dict[str, Any]) -> str:
    """One line saying which whitening the stored vectors (and future queries) go through."""
    pairs = f", {whitening['pairs']:,} matching pairs" if whitening.get("pairs") is not None else ""
    return (
        f"whitened ({whitening['method']}): {whitening['dim_in']} -> {whitening['dim_out']} dims, fitted on "
        f"{whitening['fitted_on']} ({whitening['count']:,} vectors{pairs}); queries are whitened the same way"
    )


def _print_skipped(count: int, index: Path) -> None:
    if count:
        console.print(f"[yellow]skipped {count} unreadable images; see {index / 'skipped.tsv'}[/]", highlight=False)
