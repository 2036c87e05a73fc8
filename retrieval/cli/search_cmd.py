"""``retrieval search``: query an index with image files from the shell.

With an exported model (``--query-encoder model.onnx``) nothing on this path imports torch, so a search
starts in well under a second instead of paying the torch import first; a test keeps it that way.
"""

from __future__ import annotations

from pathlib import Path

import typer

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
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Embed each query image and print its k nearest gallery images (id, score, path, labels, metadata).

    With --min-score, every gallery image scoring above that similarity is returned instead (FAISS range
    search; on index types without one, a k-NN search with a growing k filtered at the threshold, and a note).

    On a calibrated index every hit also shows its level: the finest label level whose threshold
    its score reaches. An unreadable query image is reported and skipped; the other queries still run, and the
    exit status is 1 (2 when no query could be read).
    """
    with user_errors():
        from retrieval.data.images import CorruptImageError, load_image
        from serving.engine import SearchEngine

        loaded, failures = [], []
        for path in images:
            try:
                loaded.append((path, load_image(path)))
            except CorruptImageError as exc:
                failures.append({"query": str(path), "error": str(exc)})
        queries = [img for _, img in loaded]
        options = {"providers": providers} if providers else {}
        with SearchEngine.open(index, query_encoder, runtime=runtime, **options) as engine:
            if min_score is None:
                results = engine.search(queries, k=k or DEFAULT_K, granularity=granularity)
            elif granularity is not None:
                raise fail("--min-score and --granularity are two ways to set a threshold: give one")
            else:
                results, fallback = engine.search_above(queries, min_score, limit=k)
                if fallback:
                    err_console.print(
                        "[yellow]note:[/] this index type has no native range search; a k-NN search with a "
                        "growing k, filtered at --min-score, was used (as exact as its k-NN search)",
                        highlight=False,
                    )
    payload = [{"query": str(p), **r.to_dict()} for (p, _), r in zip(loaded, results, strict=True)]
    if as_json:
        print_json({"results": payload, "errors": failures})
    else:
        for item in payload:
            console.print(f"[bold]{item['query']}[/]")
            for rank, hit in enumerate(item["hits"], start=1):
                described = {**(hit.get("labels") or {}), **(hit.get("extra") or {})}
                labels = " ".join(f"{key}={value}" for key, value in described.items())
                level = f"  level={hit['level']}" if hit.get("level") else ""
                console.print(
                    f"  {rank:>3}. {hit['score']:.4f}{level}  id={hit['id']}  {hit['path']}  {labels}", highlight=False
                )
        for failure in failures:
            console.print(f"[red]error:[/] {failure['error']}", highlight=False)
    if failures:  # a script must notice a query it did not get answers for: 2 when none ran, 1 when some did
        raise typer.Exit(1 if payload else 2)
