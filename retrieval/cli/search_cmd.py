"""``retrieval search``: query an index with image files from the shell.

With an exported model (``--query-encoder model.onnx``) nothing on this path imports torch, so a search
starts in well under a second instead of paying the torch import first; a test keeps it that way (the
contact sheet of ``--sheet`` is drawn with Pillow alone, so it stays on that path).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from retrieval.cli.backend_options import (
    backend_option,
    parse_where,
    qdrant_url_option,
    where_option,
)
from retrieval.cli.common import console, err_console, fail, print_json, user_errors

DEFAULT_K = 10


def search(
    images: list[Path] = typer.Argument(..., help="Query image files."),
    index: Path = typer.Option(..., "--index", help="Index directory to search."),
    query_encoder: Path | None = typer.Option(
        None,
        "--query-encoder",
        help="Checkpoint dir, exported .onnx/.ort file or TensorRT engine (with its .json sidecar); "
        "default: the encoder that built the index.",
    ),
    runtime: str | None = typer.Option(
        None,
        "--runtime",
        help="Force a query-encoder runtime (torch, onnxruntime, tensorrt); default: the one that accepts the file.",
    ),
    providers: list[str] | None = typer.Option(
        None,
        "--provider",
        help="ONNX Runtime execution provider, in order of preference (repeat the flag: --provider cuda "
        "--provider cpu); default CUDA if installed, then CPU. TensorRT (--provider tensorrt) only when asked: "
        "it builds its engine at start-up, which takes minutes.",
    ),
    k: int | None = typer.Option(
        None, "--k", min=1, help="Number of hits per query (default 10; with --min-score, the most to show: all)."
    ),
    min_score: float | None = typer.Option(
        None,
        "--min-score",
        min=-1.0,
        max=1.0,
        help="Return every gallery image scoring above this cosine similarity (a range search) instead of the k best.",
    ),
    granularity: str | None = typer.Option(
        None,
        "--granularity",
        help="Keep only hits above this level's calibrated threshold (fine, middle, coarse ...; up to --k); "
        "needs an index calibrated with `retrieval index calibrate`.",
    ),
    where: list[str] | None = where_option(),
    backend: str | None = backend_option(default=None),
    qdrant_url: str | None = qdrant_url_option(),
    sheet: Path | None = typer.Option(
        None,
        "--sheet",
        help="Also draw the results as a contact sheet PNG at this path: a row per query, its hits with score, "
        "calibrated level and labels, framed by level (or by agreement with --query-labels).",
    ),
    query_labels: Path | None = typer.Option(
        None,
        "--query-labels",
        help="With --sheet: a CSV of the queries' labels ('path' plus the index's level columns, paths relative "
        "to the CSV); the sheet then shows them and frames each hit by the finest level it shares with its query.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Embed each query image and print its k nearest gallery images (id, score, path, labels, metadata).

    With --min-score, every gallery image scoring above that similarity is returned instead (FAISS range
    search; on index types without one, a k-NN search with a growing k filtered at the threshold, and a note).

    With --where LEVEL=VALUE (repeatable), only gallery images with those labels are searched: the hits are
    the best among them.

    On a calibrated index every hit also shows its level: the finest label level whose threshold
    its score reaches. An unreadable query image is reported and skipped; the other queries still run, and the
    exit status is 1 (2 when no query could be read).

    With --sheet, the same results are drawn as a contact sheet PNG (see serving.contact_sheet), whose path
    is printed (in --json, as "sheet").
    """
    if query_labels is not None and sheet is None:
        raise fail("--query-labels colours the contact sheet: give --sheet too")
    filters = parse_where(where)
    with user_errors():
        from indexing.index_dir import backend_overrides
        from retrieval.data.images import CorruptImageError, load_image
        from serving.engine import SearchEngine

        backend_options = backend_overrides(index, backend, qdrant_url)
        labelled = _read_query_labels(query_labels) if query_labels is not None else None

        loaded, failures = [], []
        for path in images:
            try:
                loaded.append((path, load_image(path)))
            except CorruptImageError as exc:
                failures.append({"query": str(path), "error": str(exc)})
        queries = [img for _, img in loaded]
        options = {"providers": providers} if providers else {}
        with SearchEngine.open(
            index, query_encoder, runtime=runtime, backend_options=backend_options, **options
        ) as engine:
            if min_score is None:
                results = engine.search(queries, k=k or DEFAULT_K, granularity=granularity, where=filters)
            elif granularity is not None:
                raise fail("--min-score and --granularity are two ways to set a threshold: give one")
            else:
                results, fallback = engine.search_above(queries, min_score, limit=k, where=filters)
                if fallback:
                    err_console.print(
                        "[yellow]note:[/] this index type has no native range search; a k-NN search with a "
                        "growing k, filtered at --min-score, was used (as exact as its k-NN search)",
                        highlight=False,
                    )
            calibrated = bool(engine.thresholds)
            drawn = sheet is not None and bool(loaded)
            if drawn:
                known = _query_labels_for(loaded, labelled, list(engine.index_dir.manifest.levels))
                _write_sheet(sheet, loaded, known, results, list(engine.thresholds))
    payload = [{"query": str(p), **r.to_dict()} for (p, _), r in zip(loaded, results, strict=True)]
    if calibrated:  # below every threshold: "level": null (as the HTTP API answers), not a missing key
        for item in payload:
            for hit in item["hits"]:
                hit.setdefault("level", None)
    if as_json:
        echoed = {"where": {one.level: list(one.values) for one in filters}} if filters else {}
        print_json({"results": payload, "errors": failures, **echoed, **({"sheet": str(sheet)} if drawn else {})})
    else:
        for item in payload:
            console.print(f"[bold]{item['query']}[/]")
            for rank, hit in enumerate(item["hits"], start=1):
                described = {**(hit.get("labels") or {}), **(hit.get("extra") or {})}
                labels = " ".join(f"{key}={value}" for key, value in described.items())
                level = f"  level={hit['level'] or '-'}" if "level" in hit else ""
                console.print(
                    f"  {rank:>3}. {hit['score']:.4f}{level}  id={hit['id']}  {hit['path']}  {labels}", highlight=False
                )
        for failure in failures:
            console.print(f"[red]error:[/] {failure['error']}", highlight=False)
        if drawn:
            console.print(f"contact sheet: {sheet}", highlight=False, markup=False)
    if failures:  # a script must notice a query it did not get answers for: 2 when none ran, 1 when some did
        raise typer.Exit(1 if payload else 2)


def _read_query_labels(path: Path) -> tuple[dict[Path, dict[str, str]], list[str]]:
    """``{resolved image path: {column: value}}`` from a CSV with a ``path`` column (paths relative to the CSV),
    and its other columns."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise fail(f"--query-labels: cannot read {path}: {exc}") from None
    if "path" not in columns or not rows:
        raise fail(f"--query-labels: {path} needs a header with a 'path' column and at least one row")
    labels = {
        (path.parent / row["path"]).resolve(): {k: v for k, v in row.items() if k != "path" and k and v}
        for row in rows
        if row.get("path")
    }
    return labels, [column for column in columns if column != "path"]


def _query_labels_for(
    loaded: Sequence[tuple[Path, Any]], labelled: tuple[dict[Path, dict[str, str]], list[str]] | None, levels: list[str]
) -> list[dict[str, str]]:
    """Each query's labels at the index's levels (``{}`` for a query the CSV does not list, or without a CSV).

    Raises:
        typer.Exit: the CSV has none of the index's level columns (nothing could be compared).
    """
    if labelled is None:
        return [{} for _ in loaded]
    rows, columns = labelled
    if not set(columns) & set(levels):
        have = ", ".join(columns) or "none"
        want = ", ".join(levels) or "none: the index stores no labels"
        raise fail(f"--query-labels: its label columns ({have}) include none of the index's levels ({want})")
    found = [rows.get(path.resolve(), {}) for path, _ in loaded]
    return [{level: row[level] for level in levels if level in row} for row in found]  # finest first


def _write_sheet(
    out: Path,
    loaded: Sequence[tuple[Path, Any]],
    labels: Sequence[dict[str, str]],
    results: Sequence[Any],
    calibrated: Sequence[str],
) -> None:
    """Draw the contact sheet; a hit whose image cannot be read any more gets a placeholder tile."""
    from retrieval.data.images import CorruptImageError, load_image
    from serving.contact_sheet import render_contact_sheet

    def resolve(hit: Any) -> Any:
        try:
            return load_image(hit.path) if hit.path else None
        except (CorruptImageError, OSError):
            return None

    queries = [(image, query_labels) for (_, image), query_labels in zip(loaded, labels, strict=True)]
    names = [path.name for path, _ in loaded]
    try:
        render_contact_sheet(queries, results, resolve, out, calibrated_levels=calibrated, query_names=names)
    except OSError as exc:
        raise fail(f"--sheet: cannot write {out}: {exc}") from None
