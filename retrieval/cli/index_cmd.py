"""``retrieval index build|info|calibrate``: embed a gallery into an index directory, describe and calibrate one."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, user_errors


def build(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory that embeds the gallery."),
    images: Path = typer.Option(..., "--images", help="Gallery: a CSV (path + label columns) or an image folder."),
    out: Path = typer.Option(..., "--out", help="Index directory to write (replaced atomically if it exists)."),
    factory: str = typer.Option(
        "auto",
        help="FAISS index factory string (Flat = exact search; HNSW32; IVF1024,Flat; IVF4096,PQ64 ...) or 'auto': "
        "chosen from the gallery size and --memory-budget (exact Flat below 50k images).",
    ),
    memory_budget: str | None = typer.Option(
        None, "--memory-budget", help="Memory the index may take with --factory auto, e.g. 2GB, 500MB, 512MiB."
    ),
    target_recall: float = typer.Option(
        0.95, "--target-recall", help="Recall@10 that an approximate index's nprobe/efSearch are tuned to reach."
    ),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="Torch device for extraction (cpu, cuda)."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON."),
) -> None:
    """Embed every gallery image and write an index directory (manifest, FAISS index, SQLite metadata).

    Corrupt or unreadable images are skipped and listed in OUT/skipped.tsv; the build
    goes on and the summary counts them. The index type and why it was chosen are printed and
    recorded in the manifest; an approximate index has its search parameter (nprobe, efSearch)
    tuned to --target-recall on a sample of the gallery, stored as its default.
    """
    with user_errors():
        from indexing.builder import build_index
        from retrieval.data.datasets import open_dataset

        dataset = open_dataset(images)
        summary = build_index(
            encoder,
            dataset,
            out,
            factory=factory,
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            progress=not as_json,
            memory_budget=memory_budget,
            target_recall=target_recall,
        )
    result = {
        "index": str(out),
        "count": summary.count,
        "skipped": len(summary.skipped),
        "seconds": round(summary.seconds, 2),
        "factory": summary.factory,
        "factory_reason": summary.factory_reason,
        "search_params": summary.search_params,
        "tuning": summary.tuning,
    }
    if as_json:
        print_json(result)
        return
    console.print(f"indexed {summary.count} images into {out} in {summary.seconds:.1f}s")
    console.print(f"index type {summary.factory}: {summary.factory_reason}", highlight=False)
    if summary.tuning is not None:
        tuning = summary.tuning
        params = ", ".join(f"{k}={v}" for k, v in (summary.search_params or {}).items()) or "no search parameter"
        verdict = "reaches" if tuning["reached"] else "[yellow]falls short of[/]"
        console.print(
            f"tuned {params}: recall@{tuning['k']} {tuning['recall']:.3f} {verdict} the target "
            f"{tuning['target_recall']:.3f} on {tuning['num_queries']} gallery queries",
            highlight=False,
        )
    if len(summary.skipped):
        console.print(f"[yellow]skipped {len(summary.skipped)} unreadable images; see {out / 'skipped.tsv'}[/]")


def info(
    index: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Describe an index: size, dimension, encoder, factory, levels, thresholds."""
    with user_errors():
        from indexing.index_dir import open_index_dir

        details = open_index_dir(index).info()
    if as_json:
        print_json(details)
        return
    width = max(len(k) for k in details)
    for key, value in details.items():
        console.print(f"{key:<{width}}  {value}", highlight=False)


def calibrate(
    index: Path = typer.Argument(..., help="Index directory to calibrate (its manifest.json is rewritten atomically)."),
    labels: Path = typer.Option(
        ..., "--labels", help="Labelled validation images: a CSV with 'path' and one column per index level."
    ),
    objective: str = typer.Option("f1", "--objective", help="'f1' (best F1 per level) or 'precision>=P'."),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Encoder checkpoint directory; default: the one that built the index."
    ),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="Torch device for extraction (cpu, cuda)."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Choose one similarity threshold per label level and store them in the index's manifest.

    The validation images are embedded by the index's encoder and paired with each other,
    leave-one-out (every ordered pair of distinct images; positive at a level when both share
    its class); per level, the threshold that best meets the objective over those pairs is kept,
    in ruler order (fine >= middle >= coarse). The levels of --labels must be the index's. Prints
    threshold, precision, recall and F1 per level. Afterwards hits carry their level and
    `retrieval search --granularity LEVEL` keeps the hits above that level's threshold.
    """
    with user_errors():
        from indexing.calibrate_index import calibrate_index

        result = calibrate_index(
            index,
            labels,
            objective,
            encoder_path=encoder,
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            progress=not as_json,
        )
    if as_json:
        print_json(
            {
                "index": str(index),
                "images": result.images,
                "skipped": len(result.skipped),
                "thresholds": result.calibration.thresholds,
                "calibration": result.calibration.to_dict(),
            }
        )
        return
    console.print(f"calibrated {index} on {result.images} validation images (leave-one-out pairs)", highlight=False)
    console.print(result.calibration.format_table(), highlight=False)
    if len(result.skipped):
        console.print(f"[yellow]skipped {len(result.skipped)} unreadable validation images[/]")
