"""``retrieval evaluate dyml``: the DyML multi-granularity protocol (per-level mAP, R@K, ASI and their mean).

Embeddings come either from an encoder run over an official DyML test layout (``--data-root`` with
``--encoder``), or from a file saved by an earlier run (``--embeddings``), so the protocol can be
re-scored without the model. With ``--query-encoder`` (a student distilled into the ``--encoder``'s
space), the student's symmetric numbers, its asymmetric ones (student-embedded query lists against
``--encoder``-embedded gallery lists; on a level without a gallery, each query against the teacher
embeddings of the other query images) and the ``--encoder``'s own are printed side by side. Heavy
modules (torch, the encoder, the extraction loop) are imported inside the command, so ``retrieval
--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrieval.cli.common import console, fail, print_json, print_side_by_side, user_errors

if TYPE_CHECKING:
    import numpy as np

    from retrieval.data.datasets import LabelledImageDataset
    from retrieval.data.dyml import DymlLevelSplit
    from retrieval.evaluation.dyml import DymlLevelEmbeddings
    from retrieval.evaluation.report import EvaluationReport

__all__ = ["dyml"]


def dyml(
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Official DyML test layout (bmk_fine/, bmk_middle/, bmk_coarse/ or the Product set)."
    ),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Encoder checkpoint directory (with --data-root; with --query-encoder, the gallery's)."
    ),
    query_encoder: Path | None = typer.Option(
        None,
        "--query-encoder",
        help="Asymmetric mode: a student checkpoint embedding the query lists into --encoder's space; prints its "
        "symmetric and asymmetric numbers beside --encoder's own.",
    ),
    embeddings: Path | None = typer.Option(
        None, "--embeddings", help="Embeddings saved by --save-embeddings (.npz); no model is loaded."
    ),
    save_embeddings: Path | None = typer.Option(
        None, "--save-embeddings", help="Write the extracted embeddings and labels to this .npz file."
    ),
    ks: str = typer.Option("1,10,20", help="Comma-separated K values for Recall@K."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    eval_batch_size: int = typer.Option(
        1024, min=1, help="Queries per similarity chunk (memory is about this x gallery size x 21 bytes)."
    ),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """DyML protocol: each level (fine, middle, coarse) searched on its own query/gallery sets.

    An item is relevant when it shares the query's label at that level. Reported per level: R@K
    (hit rate), mAP over all positives and ASI (Average Search Index); the overall row is the mean
    of the levels. The same embedding serves every level: the metric never tells the model which
    level is asked. Unreadable images are skipped, reported, and left out of every level.
    """
    with user_errors():
        from retrieval.evaluation.dyml import evaluate_dyml, load_dyml_embeddings, save_dyml_embeddings
        from retrieval.evaluation.protocols import check_report_ks

        _check_sources(data_root, encoder, embeddings, save_embeddings, query_encoder)
        try:
            k_values = check_report_ks([int(k) for k in ks.split(",")])
        except ValueError as exc:
            raise typer.BadParameter(f"--ks must be distinct positive integers separated by commas ({exc})") from None
        if query_encoder is not None:
            assert data_root is not None and encoder is not None
            _asymmetric(data_root, encoder, query_encoder, k_values, batch_size, eval_batch_size, device, as_json)
            return
        skipped = 0
        if embeddings is not None:
            levels = load_dyml_embeddings(embeddings)
        else:
            levels, skipped = _extract(data_root, encoder, batch_size, device, progress=not as_json)
        saved = save_dyml_embeddings(save_embeddings, levels) if save_embeddings is not None else None
        _check_sizes(levels)
        report = evaluate_dyml(levels, ks=k_values, batch_size=eval_batch_size)
    queries = {entry.level: len(entry.query) for entry in levels}
    if as_json:
        extra: dict[str, Any] = {"protocol": "dyml", "queries_per_level": queries, "skipped": skipped}
        if saved is not None:
            extra["saved_embeddings"] = str(saved)
        print_json({**report.to_dict(), **extra})
        return
    console.print(
        "DyML protocol: each level searched on its own query/gallery sets, mean = overall "
        f"({', '.join(f'{level} {n} queries' for level, n in queries.items())})",
        highlight=False,
    )
    console.print(report.format_table(), highlight=False)
    if skipped:
        console.print(f"[yellow]skipped {skipped} unreadable images[/]")
    if saved is not None:
        console.print(f"saved embeddings to {saved}", highlight=False)


def _check_sources(
    data_root: Path | None,
    encoder: Path | None,
    embeddings: Path | None,
    save_embeddings: Path | None,
    query_encoder: Path | None = None,
) -> None:
    """Exactly one source of embeddings, and only the options that go with it."""
    if (data_root is None) == (embeddings is None):
        raise typer.BadParameter("give exactly one of --data-root (with --encoder) or --embeddings")
    if data_root is not None and encoder is None:
        raise typer.BadParameter("--data-root needs --encoder (the checkpoint that embeds the images)")
    if embeddings is not None and encoder is not None:
        raise typer.BadParameter("--encoder is only used with --data-root; --embeddings are already embedded")
    if embeddings is not None and save_embeddings is not None:
        raise typer.BadParameter("--save-embeddings only applies to embeddings extracted from --data-root")
    if query_encoder is not None and embeddings is not None:
        raise typer.BadParameter("--query-encoder needs --data-root and --encoder; --embeddings are already embedded")
    if query_encoder is not None and save_embeddings is not None:
        raise typer.BadParameter(
            "--save-embeddings stores one encoder's embeddings; run without --query-encoder to save each encoder's"
        )


def _asymmetric(
    data_root: Path,
    encoder: Path,
    query_encoder: Path,
    ks: list[int],
    batch_size: int,
    eval_batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Score the student alone, the student against the ``--encoder`` gallery, and the ``--encoder`` alone."""
    from models import read_checkpoint_info
    from retrieval.cli.pairing import check_query_encoder_pairing
    from retrieval.evaluation.asymmetric import ASYMMETRIC, SYMMETRIC, TEACHER
    from retrieval.evaluation.dyml import evaluate_dyml

    gallery_info = read_checkpoint_info(encoder)
    query_info = read_checkpoint_info(query_encoder)
    check_query_encoder_pairing(query_info, gallery_info)  # before any image is read or model loaded
    modes, skipped = _extract_pair(data_root, query_encoder, encoder, batch_size, device, progress=not as_json)
    reports: dict[str, EvaluationReport] = {}
    for mode in (SYMMETRIC, ASYMMETRIC, TEACHER):
        _check_sizes(modes[mode])
        reports[mode] = evaluate_dyml(modes[mode], ks=ks, batch_size=eval_batch_size)
    queries = {entry.level: len(entry.query) for entry in modes[SYMMETRIC]}
    if as_json:
        ids = {"encoder_id": gallery_info.encoder_id, "query_encoder_id": query_info.encoder_id}
        payload = {m: r.to_dict() for m, r in reports.items()}
        print_json({"protocol": "dyml", "mode": "asymmetric", **ids, **payload, "queries_per_level": queries,
                    "skipped": skipped})  # fmt: skip
        return
    title = "DyML protocol in % (R@K = hit rate, mAP over all positives, ASI), mean = overall " + (
        f"({', '.join(f'{level} {n} queries' for level, n in queries.items())})"
    )
    print_side_by_side(reports, query_info.encoder_id, gallery_info.encoder_id, title)
    if skipped:
        console.print(f"[yellow]skipped {skipped} unreadable images[/]")


def _extract_pair(
    data_root: Path, student: Path, teacher: Path, batch_size: int, device: str, progress: bool
) -> tuple[dict[str, list[DymlLevelEmbeddings]], int]:
    """Per-level embeddings of the three modes, and the number of distinct images left out as unreadable.

    Both encoders embed every distinct image once. An image either cannot read is left out of every
    mode, so the three reports score the same queries against the same galleries.
    """
    from models import load_encoder
    from retrieval.data.dyml import open_dyml_test
    from retrieval.evaluation.asymmetric import ASYMMETRIC, SYMMETRIC, TEACHER

    splits = open_dyml_test(data_root)
    vectors, dims = [], []
    for checkpoint in (student, teacher):
        model = load_encoder(checkpoint, device=device)
        vectors.append(_embed_distinct(splits, model, batch_size, device, progress)[0])
        dims.append(model.embedding_dim)
        del model
    unreadable = [name for name in vectors[0] if vectors[0][name] is None or vectors[1][name] is None]
    for name in unreadable:
        vectors[0][name] = vectors[1][name] = None
    student_levels = [_level_embeddings(split, vectors[0], dims[0]) for split in splits]
    teacher_levels = [_level_embeddings(split, vectors[1], dims[1]) for split in splits]
    asymmetric = [_asymmetric_level(s, t) for s, t in zip(student_levels, teacher_levels, strict=True)]
    return {SYMMETRIC: student_levels, ASYMMETRIC: asymmetric, TEACHER: teacher_levels}, len(unreadable)


def _asymmetric_level(student: DymlLevelEmbeddings, teacher: DymlLevelEmbeddings) -> DymlLevelEmbeddings:
    """Student queries against the teacher's gallery; on a level without one, the teacher's other queries."""
    from retrieval.evaluation.dyml import DymlLevelEmbeddings

    if teacher.gallery is None:
        return DymlLevelEmbeddings(
            student.level, student.query, student.query_labels, teacher.query, teacher.query_labels, exclude_self=True
        )
    return DymlLevelEmbeddings(
        student.level, student.query, student.query_labels, teacher.gallery, teacher.gallery_labels
    )


def _extract(
    data_root: Path, encoder: Path, batch_size: int, device: str, progress: bool
) -> tuple[list[DymlLevelEmbeddings], int]:
    """Embed every distinct image of the DyML test set once; return the per-level embeddings and skip count."""
    from models import load_encoder
    from retrieval.data.dyml import open_dyml_test

    splits = open_dyml_test(data_root)
    model = load_encoder(encoder, device=device)
    vectors, skipped = _embed_distinct(splits, model, batch_size, device, progress)
    return [_level_embeddings(split, vectors, model.embedding_dim) for split in splits], skipped


def _embed_distinct(
    splits: list[DymlLevelSplit], model: Any, batch_size: int, device: str, progress: bool
) -> tuple[dict[str, np.ndarray | None], int]:
    """Map each distinct image file to its embedding (``None`` when unreadable).

    The Product layout uses one image set for all three levels, so a file is embedded the first
    time it is met and looked up afterwards.
    """
    from indexing.extract import extract_embeddings

    vectors: dict[str, np.ndarray | None] = {}
    skipped = 0
    for dataset in (part for split in splits for part in (split.query, split.gallery) if part is not None):
        new: list[int] = []
        for i, name in enumerate(dataset.names):
            if name not in vectors:
                vectors[name] = None
                new.append(i)
        if not new:
            continue
        extraction = extract_embeddings(
            model, dataset.subset(new), batch_size=batch_size, device=device, progress=progress
        )
        for row, j in enumerate(extraction.indices):
            vectors[dataset.names[new[int(j)]]] = extraction.embeddings[row]
        skipped += len(extraction.skipped)
    return vectors, skipped


def _level_embeddings(split: DymlLevelSplit, vectors: dict[str, np.ndarray | None], dim: int) -> DymlLevelEmbeddings:
    from retrieval.evaluation.dyml import DymlLevelEmbeddings

    parts = [part for part in (split.query, split.gallery) if part is not None]
    readable = [_readable(part, vectors, dim) for part in parts]
    ids = _shared_ids([names for _, names in readable])
    gallery, gallery_ids = (readable[1][0], ids[1]) if split.gallery is not None else (None, None)
    return DymlLevelEmbeddings(split.level, readable[0][0], ids[0], gallery, gallery_ids)


def _readable(
    dataset: LabelledImageDataset, vectors: dict[str, np.ndarray | None], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and class names of the dataset's readable images (unreadable rows dropped)."""
    import numpy as np

    rows = [vectors[name] for name in dataset.names]
    keep = np.array([row is not None for row in rows], dtype=bool)
    kept = [row for row in rows if row is not None]
    embeddings = np.stack(kept) if kept else np.zeros((0, dim), dtype=np.float32)
    class_names = np.asarray(dataset.vocab.names[0], dtype=np.str_)[dataset.labels[keep, 0]]
    return embeddings, class_names


def _shared_ids(class_names: list[np.ndarray]) -> list[np.ndarray]:
    """Integer ids that mean the same class in every part (query and gallery have separate vocabularies).

    The dataset's own ids are kept when they are all integers (so a saved file matches the label
    files); other names are numbered jointly.
    """
    import numpy as np

    try:
        ids = [names.astype(np.int64) for names in class_names]
    except (ValueError, OverflowError):
        ids = None
    if ids is not None and all(
        (part.astype(np.str_) == names).all() for part, names in zip(ids, class_names, strict=True)
    ):
        return ids
    _, codes = np.unique(np.concatenate(class_names), return_inverse=True)
    bounds = np.cumsum([len(names) for names in class_names])[:-1]
    return [part.astype(np.int64) for part in np.split(codes, bounds)]


def _check_sizes(levels: list[DymlLevelEmbeddings]) -> None:
    """Say which level has nothing left to evaluate, instead of failing deep in the protocol."""
    for entry in levels:
        if entry.leave_one_out and len(entry.query) < 2:
            raise fail(f"level {entry.level!r}: {len(entry.query)} query item(s); leave-one-out retrieval needs two")
        if len(entry.query) == 0:
            raise fail(f"level {entry.level!r}: no query left to evaluate (all unreadable?)")
        if entry.gallery is not None and len(entry.gallery) == 0:
            raise fail(f"level {entry.level!r}: empty gallery (all images unreadable?)")
