"""``retrieval evaluate recall``: per-level Recall@K and mAP of an encoder on a labelled image set."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, user_errors


def recall(
    encoder: Path = typer.Option(..., "--encoder", help="Encoder checkpoint directory."),
    images: Path = typer.Option(..., "--images", help="Labelled set: CSV (path + level columns) or image folder."),
    ks: str = typer.Option("1,5,10", help="Comma-separated K values for Recall@K."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Leave-one-out retrieval on a labelled set: each image queries all the others.

    Recall@K is the hit rate (a relevant item in the top K); mAP averages precision over
    all relevant items. Both are reported per label level and averaged over levels.
    """
    with user_errors():
        from indexing.extract import extract_embeddings
        from models import load_encoder
        from retrieval.data.datasets import DatasetError, open_dataset
        from retrieval.evaluation.protocols import check_report_ks, evaluate_embeddings

        try:
            k_values = check_report_ks([int(k) for k in ks.split(",")])
        except ValueError as exc:
            raise typer.BadParameter(f"--ks must be distinct positive integers separated by commas ({exc})") from None
        dataset = open_dataset(images)
        model = load_encoder(encoder, device=device)
        extraction = extract_embeddings(model, dataset, batch_size=batch_size, device=device, progress=not as_json)
        if len(extraction) < 2:
            raise DatasetError(f"{images}: {len(extraction)} readable image(s); leave-one-out retrieval needs two")
        labels = dataset.labels[extraction.indices]
        report = evaluate_embeddings(extraction.embeddings, labels, schema=dataset.schema, ks=k_values)
    if as_json:
        print_json({**report.to_dict(), "skipped": len(extraction.skipped)})
        return
    console.print(report.format_table(), highlight=False)
    if len(extraction.skipped):
        console.print(f"[yellow]skipped {len(extraction.skipped)} unreadable images[/]")
