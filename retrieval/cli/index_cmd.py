"""``retrieval index build|info``: embed a gallery into an index directory and describe one."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, user_errors


def build(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory that embeds the gallery."),
    images: Path = typer.Option(..., "--images", help="Gallery: a CSV (path + label columns) or an image folder."),
    out: Path = typer.Option(..., "--out", help="Index directory to write (replaced atomically if it exists)."),
    factory: str = typer.Option("Flat", help="FAISS index factory string (Flat = exact search)."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="Torch device for extraction (cpu, cuda)."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON."),
) -> None:
    """Embed every gallery image and write an index directory (manifest, FAISS index, SQLite metadata).

    Corrupt or unreadable images are skipped and listed in OUT/skipped.tsv; the build
    goes on and the summary counts them.
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
        )
    result = {
        "index": str(out),
        "count": summary.count,
        "skipped": len(summary.skipped),
        "seconds": round(summary.seconds, 2),
    }
    if as_json:
        print_json(result)
        return
    console.print(f"indexed {summary.count} images into {out} in {summary.seconds:.1f}s")
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
