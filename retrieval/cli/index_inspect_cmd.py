"""``retrieval index info|verify|calibrate``: describe and check an index directory, store its thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from retrieval.cli.common import console, print_json, user_errors


def info(
    index: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print every field as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="First check every vector and row (as `index verify`), recording missing checksums."
    ),
) -> None:
    """Describe an index: items, ids, index type and search defaults, encoder, levels, thresholds, files, history."""
    with user_errors():
        from indexing.calibration_plot import CALIBRATION_PLOT_FILE
        from indexing.index_dir import open_index_dir
        from indexing.verify import verify_index_dir

        report = verify_index_dir(index) if verify else None
        with open_index_dir(index) as directory:
            details = directory.info()
    if report is not None:
        details["verify"] = report.to_dict()
    plot = Path(details["path"]) / CALIBRATION_PLOT_FILE
    details["calibration_plot"] = str(plot) if details["calibration"] and plot.is_file() else None
    if as_json:
        print_json(details)
        return
    for key, value in describe(details):
        console.print(f"{key:<12} {escape(value)}", highlight=False, soft_wrap=True)
    for warning in stored_warnings(details):
        console.print(f"[yellow]warning:[/] {escape(warning['message'])}", highlight=False, soft_wrap=True)


def verify(
    index: Path = typer.Argument(
        ..., help="Index directory to check (its manifest.json gains checksums if it has none)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every part of an index: checksums, every vector, the graph, ids against metadata, the database.

    An index whose manifest predates checksums is checked structurally and, when it passes, its manifest is
    rewritten (atomically) with the checksums of its files, so every later open verifies them. A problem is
    one `error:` line naming the file, exit status 2.
    """
    with user_errors():
        from indexing.verify import verify_index_dir

        report = verify_index_dir(index)
    if as_json:
        print_json(report.to_dict())
        return
    note = {"verified": "checksums verified", "recorded": "checksums recorded in manifest.json"}[report.checksums]
    note += ", whitening verified" if report.whitening else ""
    console.print(
        f"{index}: ok, {report.count:,} items, {report.vectors_checked:,} vectors checked, {note}", highlight=False
    )


def _whitening_line(details: dict[str, Any]) -> str:
    whitening = details.get("whitening")
    if not whitening:
        return "none (the encoder's vectors as they are)"
    return (
        f"{whitening['method']}: {whitening['dim_in']} -> {whitening['dim_out']} dims, queries whitened the same "
        f"way; fitted on {whitening['fitted_on']} ({whitening['count']:,} vectors)"
    )


def describe(details: dict[str, Any]) -> list[tuple[str, str]]:
    """``IndexDirectory.info()`` as labelled lines for a person to read."""
    backend = details.get("backend", "faiss")
    ids = details["id_range"]
    lines = [
        ("index", details["path"]),
        ("items", f"{details['count']:,} indexed, {details['skipped']:,} skipped as unreadable"),
        ("ids", f"{ids[0]} .. {ids[1]}" if ids else "none"),
        ("vectors", f"{details['dim']}-d, {details['metric'].replace('_', ' ')} on L2-normalised vectors"),
        ("whitening", _whitening_line(details)),
        ("factory", f"{details['factory']}" + (f" ({details['factory_reason']})" if details["factory_reason"] else "")),
        ("backend", _backend_line(backend, details[backend])),
        ("search", _search_line(details, details[backend])),
        ("encoder", f"{details['encoder_id']}" + (f" ({details['encoder_path']})" if details["encoder_path"] else "")),
        ("levels", ", ".join(details["levels"]) or "none (unlabelled)"),
        ("thresholds", _thresholds_line(details)),
        *((("plot", details["calibration_plot"]),) if details.get("calibration_plot") else ()),
        ("files", ", ".join(f"{name} {_size(size)}" for name, size in details["files"].items())),
        ("size", _size(details["size_bytes"])),
        ("checksum", _checksum_line(details)),
        ("format", f"version {details['format_version']}, created {details['created_at']}"),
    ]
    for entry in details["history"]:
        shards = f" from {entry['shards']} shards" if entry.get("shards", 1) > 1 else ""
        lines.append(
            (
                "history",
                f"{entry['at']} {entry['action']}{shards}: {entry['added']:,} of {entry['images']:,} images from "
                f"{entry['source']} ({entry['skipped']:,} skipped)",
            )
        )
    return lines


def stored_warnings(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The calibration warnings stored in the manifest (none for an uncalibrated index or an older calibration)."""
    diagnostics = (details.get("calibration") or {}).get("diagnostics") or {}
    return list(diagnostics.get("warnings", []))


def _checksum_line(details: dict[str, Any]) -> str:
    in_file = details.get("backend", "faiss") == "faiss"  # a server backend's vectors have no file to hash
    digest = details["index_sha256"] if in_file else details["metadata_sha256"]
    if not digest:
        return "not recorded (retrieval index verify INDEX records them)"
    line = f"sha256 {digest}" + ("" if in_file else " (metadata.sqlite; the vectors live in the backend)")
    if details.get("verify"):
        line += f" (verified: {details['verify']['vectors_checked']:,} vectors checked)"
    return line


def _backend_line(backend: str, state: dict[str, Any]) -> str:
    if backend == "faiss":
        return "faiss (index.faiss in the directory)"
    where = ", ".join(f"{key} {state[key]}" for key in ("url", "collection", "physical") if state.get(key))
    return f"{backend} ({where})" if where else backend


def _search_line(details: dict[str, Any], state: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in state.get("default_params", {}).items()) or "exact (no parameter)"
    nlist = f"; {state['nlist']} inverted lists" if state.get("nlist") else ""
    tuning = details.get("tuning")
    if not tuning:
        return params + nlist
    verdict = "reached" if tuning["reached"] else "not reached"
    return (
        f"{params}{nlist}; tuned at build for recall@{tuning['k']} >= {tuning['target_recall']:.3f} "
        f"({verdict}: {tuning['recall']:.3f} on {tuning['num_queries']} gallery queries)"
    )


def _thresholds_line(details: dict[str, Any]) -> str:
    if not details["thresholds"]:
        return "not calibrated (retrieval index calibrate INDEX --labels CSV)"
    line = ", ".join(f"{level} {value:.4f}" for level, value in details["thresholds"].items())
    calibration = details.get("calibration") or {}
    if calibration.get("diagnostics") is not None:
        count = len(stored_warnings(details))
        line += f" ({count} calibration warning{'s' if count != 1 else ''})" if count else " (no calibration warning)"
    return line


def _size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size} B"


def calibrate(
    index: Path = typer.Argument(..., help="Index directory to calibrate (its manifest.json is rewritten atomically)."),
    labels: Path = typer.Option(
        ..., "--labels", help="Labelled validation images: a CSV with 'path' and one column per index level."
    ),
    objective: str = typer.Option("f1", "--objective", help="'f1' (best F1 per level) or 'precision>=P'."),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Encoder checkpoint directory; default: the one that built the index."
    ),
    query_encoder: Path | None = typer.Option(
        None,
        "--query-encoder",
        help="The student checkpoint that will embed the queries (AML): fit the thresholds to its queries against "
        "the index encoder's embeddings of the other images, the pairs a served student meets.",
    ),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option(
        "auto", help="Torch device for extraction: auto (CUDA when visible), cpu, cuda, cuda:N."
    ),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Choose one similarity threshold per label level and store them in the index's manifest.

    The validation images are embedded by the index's encoder and paired with each other,
    leave-one-out (every ordered pair of distinct images; positive at a level when both share
    its class); per level, the threshold that best meets the objective over those pairs is kept,
    in ruler order (fine >= middle >= coarse). The levels of --labels must be the index's. Prints
    threshold, precision, recall, F1 and AUC per level, the score percentiles of same-class and other
    pairs, and warnings when the thresholds cannot be trusted (low F1 or precision, overlapping classes,
    scores squeezed into a narrow band, thresholds crowded together); writes INDEX/calibration.png with
    the score histograms and thresholds per level. Afterwards hits carry their level (none below every
    threshold) and `retrieval search --granularity LEVEL` keeps the hits above that level's threshold.
    """
    with user_errors():
        from indexing.calibrate_index import calibrate_index

        result = calibrate_index(
            index,
            labels,
            objective,
            encoder_path=encoder,
            query_encoder_path=query_encoder,
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
                "warnings": [warning.to_dict() for warning in result.calibration.warnings],
                "plot": None if result.plot is None else str(result.plot),
                "calibration": result.calibration.to_dict(),
            }
        )
        return
    print_calibration(result, index)


def print_calibration(result: Any, index: Path) -> None:
    """The calibration summary a person reads: images used, the per-level table, the plot, skipped images, warnings.

    The warnings come last, in yellow, so that they are the last thing on the screen.
    """
    console.print(f"calibrated {index} on {result.images} validation images (leave-one-out pairs)", highlight=False)
    console.print(escape(result.calibration.format_table()), highlight=False, soft_wrap=True)
    if getattr(result, "plot", None) is not None:
        console.print(f"plot: {escape(str(result.plot))}", highlight=False, soft_wrap=True)
    if len(result.skipped):
        console.print(f"[yellow]skipped {len(result.skipped)} unreadable validation images[/]")
    for warning in result.calibration.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning.message)}", highlight=False, soft_wrap=True)
