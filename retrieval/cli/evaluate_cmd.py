"""``retrieval evaluate recall``: per-level Recall@K and mAP of an encoder on a labelled image set.

With ``--query-encoder`` (a student distilled into the ``--encoder``'s space, AML), the run compares
three leave-one-out evaluations of the same images: the student on both sides (symmetric), student
queries against ``--encoder`` gallery embeddings (asymmetric, each query's own image left out), and the
``--encoder`` on both sides (the teacher's own numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrieval.cli.common import console, print_json, print_side_by_side, user_errors

if TYPE_CHECKING:
    from retrieval.data.datasets import LabelledImageDataset

__all__ = ["recall"]


def recall(
    encoder: Path = typer.Option(
        ..., "--encoder", help="Encoder checkpoint directory (with --query-encoder: the gallery/teacher encoder)."
    ),
    images: Path = typer.Option(..., "--images", help="Labelled set: CSV (path + level columns) or image folder."),
    query_encoder: Path | None = typer.Option(
        None,
        "--query-encoder",
        help="Asymmetric mode: a student checkpoint embedding the queries into --encoder's space; prints its "
        "symmetric and asymmetric numbers beside --encoder's own.",
    ),
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
        from retrieval.data.datasets import open_dataset
        from retrieval.evaluation.protocols import check_report_ks

        try:
            k_values = check_report_ks([int(k) for k in ks.split(",")])
        except ValueError as exc:
            raise typer.BadParameter(f"--ks must be distinct positive integers separated by commas ({exc})") from None
        if query_encoder is not None:
            _asymmetric(encoder, query_encoder, images, k_values, batch_size, device, as_json)
            return
        from indexing.extract import extract_embeddings
        from models import load_encoder
        from retrieval.evaluation.protocols import evaluate_chance, evaluate_embeddings

        dataset = open_dataset(images)
        model = load_encoder(encoder, device=device)
        extraction = extract_embeddings(model, dataset, batch_size=batch_size, device=device, progress=not as_json)
        _check_enough(images, len(extraction))
        labels = dataset.labels[extraction.indices]
        report = evaluate_embeddings(extraction.embeddings, labels, schema=dataset.schema, ks=k_values)
        chance = evaluate_chance(labels, extraction.embeddings.shape[1], schema=dataset.schema, ks=k_values)
    if as_json:
        print_json({**report.to_dict(), "chance": chance.to_dict(), "skipped": len(extraction.skipped)})
        return
    from retrieval.evaluation.report import format_side_by_side

    title = f"{encoder.name} beside chance (random unit vectors, the same labels and protocol)"
    console.print(format_side_by_side({"encoder": report, "chance": chance}, title=title), highlight=False)
    _print_skipped(len(extraction.skipped))


def _asymmetric(
    encoder: Path, query_encoder: Path, images: Path, ks: list[int], batch_size: int, device: str, as_json: bool
) -> None:
    """Embed the set with both encoders and print the symmetric, asymmetric and teacher reports."""
    from models import read_checkpoint_info
    from retrieval.cli.pairing import check_query_encoder_pairing
    from retrieval.data.datasets import open_dataset
    from retrieval.evaluation.asymmetric import evaluate_asymmetric

    gallery_info = read_checkpoint_info(encoder)
    query_info = read_checkpoint_info(query_encoder)
    check_query_encoder_pairing(query_info, gallery_info)  # before any image is read or model loaded
    dataset = open_dataset(images)
    student, teacher, kept, skipped = _embed_both(dataset, query_encoder, encoder, batch_size, device, not as_json)
    _check_enough(images, len(kept))
    reports = evaluate_asymmetric(student, teacher, dataset.labels[kept], schema=dataset.schema, ks=ks)
    ids = {"encoder_id": gallery_info.encoder_id, "query_encoder_id": query_info.encoder_id}
    if as_json:
        print_json({"mode": "asymmetric", **ids, **{m: r.to_dict() for m, r in reports.items()}, "skipped": skipped})
        return
    title = f"Retrieval metrics in % (R@K = hit rate, mAP over all positives), {len(kept)} queries"
    print_side_by_side(reports, query_info.encoder_id, gallery_info.encoder_id, title)
    _print_skipped(skipped)


def _embed_both(
    dataset: LabelledImageDataset, student: Path, teacher: Path, batch_size: int, device: str, progress: bool
) -> tuple[Any, Any, Any, int]:
    """Student and teacher embeddings of the images both could read, row-aligned; and how many were skipped."""
    import numpy as np

    from indexing.extract import extract_embeddings
    from models import load_encoder

    runs = []
    for checkpoint in (student, teacher):
        model = load_encoder(checkpoint, device=device)
        runs.append(extract_embeddings(model, dataset, batch_size=batch_size, device=device, progress=progress))
        del model
    # Both read the same files, so they skip the same ones; intersecting keeps rows aligned regardless.
    kept = np.intersect1d(runs[0].indices, runs[1].indices)
    rows = [np.searchsorted(run.indices, kept) for run in runs]
    return runs[0].embeddings[rows[0]], runs[1].embeddings[rows[1]], kept, len(dataset) - len(kept)


def _check_enough(images: Path, readable: int) -> None:
    from retrieval.data.datasets import DatasetError

    if readable < 2:
        raise DatasetError(f"{images}: {readable} readable image(s); leave-one-out retrieval needs two")


def _print_skipped(skipped: int) -> None:
    if skipped:
        console.print(f"[yellow]skipped {skipped} unreadable images[/]")
