"""Evaluation protocols: turn embeddings + hierarchical labels into an :class:`EvaluationReport`.

One protocol covers both the metric-learning convention (no gallery: every item queries all the
others, as on CUB/Cars/SOP) and the query/gallery convention (In-Shop, DyML, asymmetric testing
with a student query encoder and a teacher gallery). Queries are processed in chunks so memory
stays at ``batch_size x gallery`` whatever the number of queries: mAP needs each query's full
ranking, so a chunk's similarities are fully sorted before the next chunk is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.data.labels import DEFAULT_LEVELS, LabelSchema
from retrieval.evaluation.metrics import (
    RankWorkspace,
    average_precision,
    average_search_index,
    check_ks,
    first_relevant_rank,
    rank_by_similarity,
)
from retrieval.evaluation.report import EvaluationReport

__all__ = ["as_embeddings", "as_labels", "check_report_ks", "evaluate_chance", "evaluate_embeddings", "resolve_schema"]

logger = logging.getLogger(__name__)

_NORM_TOLERANCE = 1e-3


def evaluate_embeddings(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any | None = None,
    gallery_labels: Any | None = None,
    schema: LabelSchema | Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
    levels: Sequence[str] | None = None,
    *,
    asi: bool = False,
    exclude_self: bool = False,
) -> EvaluationReport:
    """Recall@K (hit rate) and all-positives mAP per label level, and their mean over levels.

    Relevance at level k means "same class id in label column k" (column 0 = finest level). The
    similarity is the inner product of the given embeddings, which are expected L2-normalised
    (a warning is logged otherwise); it is computed in float32. Rankings break exact ties by the
    lower gallery index and metrics are kept per query until the end, so chunking does not change
    the result (beyond float32 matmul rounding, which BLAS may vary with the chunk size).

    Leave-one-out (no gallery given): each query ranks all the *other* query items; it never
    retrieves itself. With a gallery, each query ranks the whole gallery (if the same images are in
    both, they are not removed; pass no gallery for that case, or ``exclude_self``).

    Asymmetric leave-one-out (``exclude_self``): the gallery holds the *same* items as the queries, in
    the same order, embedded by another encoder (AML: student queries, teacher gallery). Query ``i``
    then ranks every gallery item but ``i``, exactly as leave-one-out drops the diagonal; otherwise
    each query would find its own teacher embedding first and R@1 would measure distillation, not
    retrieval. With ``gallery_emb = query_emb`` the result is the leave-one-out one.

    Queries with no relevant item at a level (a singleton class in leave-one-out, or a class absent
    from the gallery) have undefined R@K and AP there: they are left out of that level's means, and
    ``report.counted[level]`` says how many queries did count. ``report.num_queries`` is the total.

    Args:
        query_emb: ``(Q, D)`` query embeddings (numpy array or CPU torch tensor).
        query_labels: ``(Q, L)`` integer labels, column 0 the finest level (``(Q,)`` means L = 1).
        gallery_emb: ``(G, D)`` gallery embeddings, or ``None`` for leave-one-out.
        gallery_labels: ``(G, L)`` gallery labels; required exactly when ``gallery_emb`` is given.
        schema: level names for the label columns (a ``LabelSchema`` or a list of names). ``None``
            uses ``("fine", "middle", "coarse")`` for 3 columns, ``("fine",)`` for 1, otherwise
            ``level0, level1, ...``.
        ks: cut-offs for Recall@K; reported as ``"R@K"`` in the given order, before ``"mAP"``.
        batch_size: queries per chunk; working memory is about ``batch_size x G x 21`` bytes plus
            the positives of the chunk, so lower it for very large galleries.
        levels: evaluate only these levels (names from the schema); default all.
        asi: also report the DyML Average Search Index as an ``"ASI"`` column after ``"mAP"``
            (computed in the same pass over the chunks, from the same rankings).
        exclude_self: gallery item ``i`` is query item ``i`` (see above) and is left out of query
            ``i``'s ranking. Needs a gallery of the queries' length; ``gallery_labels`` may then be
            omitted (they are the query labels) and, if given, must equal them.

    Returns:
        An :class:`EvaluationReport` with values in [0, 1].

    Raises:
        ValueError: on mismatched shapes, non-integer labels, non-finite embeddings, bad ``ks`` or
            ``batch_size``, a leave-one-out set with fewer than two items, or ``exclude_self`` without
            a gallery, with a gallery of another length or with labels that differ from the queries'.
    """
    queries = as_embeddings(query_emb, "query_emb")
    if len(queries) == 0:
        raise ValueError("query_emb is empty; there is nothing to evaluate")
    q_labels = as_labels(query_labels, "query_labels", len(queries))
    leave_one_out = gallery_emb is None
    if exclude_self:
        gallery_labels = _self_gallery_labels(q_labels, gallery_emb, gallery_labels)
    if leave_one_out:
        if gallery_labels is not None:
            raise ValueError("gallery_labels was given without gallery_emb; pass both or neither")
        if len(queries) < 2:
            raise ValueError("leave-one-out evaluation needs at least 2 items (each query searches the others)")
        gallery, g_labels = queries, q_labels
    else:
        if gallery_labels is None:
            raise ValueError("gallery_emb was given without gallery_labels; pass both or neither")
        gallery = as_embeddings(gallery_emb, "gallery_emb")
        g_labels = as_labels(gallery_labels, "gallery_labels", len(gallery))
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(
                f"query_emb has dimension {queries.shape[1]} but gallery_emb has {gallery.shape[1]}; "
                "queries and gallery must live in the same embedding space"
            )
        if g_labels.shape[1] != q_labels.shape[1]:
            raise ValueError(f"query_labels has {q_labels.shape[1]} levels but gallery_labels has {g_labels.shape[1]}")
        if len(gallery) == 0:
            raise ValueError("gallery_emb is empty; there is nothing to retrieve")

    schema = resolve_schema(schema, q_labels.shape[1])
    columns = schema.select(levels)
    if not columns:
        raise ValueError("levels is empty; name at least one level to evaluate (or pass None for all)")
    ks = check_report_ks(ks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _warn_if_not_normalised(queries, "query_emb")
    if not leave_one_out:
        _warn_if_not_normalised(gallery, "gallery_emb")

    num_queries = len(queries)
    first, ap, asi_values = _first_hits_and_ap(
        queries,
        q_labels,
        gallery,
        g_labels,
        columns,
        int(batch_size),
        shared_labels=leave_one_out,
        exclude_diagonal=leave_one_out or exclude_self,
        asi=asi,
    )

    per_level: dict[str, dict[str, float]] = {}
    counted: dict[str, int] = {}
    for row, column in enumerate(columns):
        name = schema.levels[column]
        valid = first[row] >= 0
        counted[name] = int(valid.sum())
        metrics: dict[str, float] = {}
        for k in ks:
            metrics[f"R@{k}"] = float((first[row, valid] < k).mean()) if valid.any() else float("nan")
        metrics["mAP"] = float(ap[row, valid].mean()) if valid.any() else float("nan")
        if asi_values is not None:
            metrics["ASI"] = float(asi_values[row, valid].mean()) if valid.any() else float("nan")
        per_level[name] = metrics
        if counted[name] < num_queries:
            logger.info(
                "level %s: %d of %d queries have no relevant item and are left out of its means",
                name,
                num_queries - counted[name],
                num_queries,
            )
    return EvaluationReport.from_levels(per_level, num_queries=num_queries, counted=counted)


def _first_hits_and_ap(
    queries: np.ndarray,
    q_labels: np.ndarray,
    gallery: np.ndarray,
    g_labels: np.ndarray,
    columns: list[int],
    batch_size: int,
    *,
    shared_labels: bool,
    exclude_diagonal: bool,
    asi: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per level and query: 0-based rank of the first relevant item (-1 if none), AP and ASI (NaN if none).

    ASI is ``None`` unless ``asi`` is set. ``shared_labels``: the gallery labels are the query labels
    (leave-one-out). ``exclude_diagonal``: query ``i`` never ranks gallery item ``i`` (leave-one-out,
    and ``exclude_self``).

    Keeping per-query values (not running sums) makes the final means independent of the chunking.
    All ``(chunk, G)`` buffers are allocated once and reused, which dominates the run time otherwise.
    """
    num_queries, width = len(queries), len(gallery)
    rows = min(batch_size, num_queries)
    q_codes, g_codes = _label_codes(q_labels, g_labels, columns, shared_labels)
    scores = np.empty((rows, width), dtype=np.float32)
    ranked_labels = np.empty((rows, width - int(exclude_diagonal)), dtype=np.int32)
    relevance = np.empty(ranked_labels.shape, dtype=bool)
    workspace = RankWorkspace()
    first = np.full((len(columns), num_queries), -1, dtype=np.int64)
    ap = np.full((len(columns), num_queries), np.nan, dtype=np.float64)
    asi_values = np.full((len(columns), num_queries), np.nan, dtype=np.float64) if asi else None
    for start in range(0, num_queries, batch_size):
        stop = min(start + batch_size, num_queries)
        chunk = stop - start
        np.matmul(queries[start:stop], gallery.T, out=scores[:chunk])
        exclude = np.arange(start, stop) if exclude_diagonal else None
        ranking = rank_by_similarity(scores[:chunk], exclude, workspace=workspace)
        for row in range(len(columns)):
            np.take(g_codes[row], ranking, out=ranked_labels[:chunk], mode="clip")
            np.equal(ranked_labels[:chunk], q_codes[row, start:stop, None], out=relevance[:chunk])
            first[row, start:stop] = first_relevant_rank(relevance[:chunk])
            ap[row, start:stop] = average_precision(relevance[:chunk])
            if asi_values is not None:
                asi_values[row, start:stop] = average_search_index(relevance[:chunk])
    return first, ap, asi_values


def _self_gallery_labels(q_labels: np.ndarray, gallery_emb: Any | None, gallery_labels: Any | None) -> np.ndarray:
    """The gallery labels of an ``exclude_self`` evaluation: the query labels, after checking the pairing.

    Row ``i`` of both sides must be the same item; a gallery of another length, or labels that
    differ, mean the two sides were not embedded from one list, and excluding "self" would drop an
    unrelated item.
    """
    if gallery_emb is None:
        raise ValueError("exclude_self needs gallery_emb (the same items embedded by the gallery encoder)")
    num_gallery = len(_to_numpy(gallery_emb))
    if num_gallery != len(q_labels):
        raise ValueError(
            f"exclude_self pairs query i with gallery item i, but there are {len(q_labels)} queries "
            f"and {num_gallery} gallery items"
        )
    if len(q_labels) < 2:
        raise ValueError("exclude_self evaluation needs at least 2 items (each query searches the others)")
    if gallery_labels is None:
        return q_labels
    g_labels = as_labels(gallery_labels, "gallery_labels", num_gallery)
    if g_labels.shape != q_labels.shape or not np.array_equal(g_labels, q_labels):
        raise ValueError("exclude_self pairs query i with gallery item i, but gallery_labels differ from query_labels")
    return g_labels


def _label_codes(
    q_labels: np.ndarray, g_labels: np.ndarray, columns: list[int], shared: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Relabel each level with small int32 codes shared by queries and gallery (halves the gather traffic)."""
    q_codes = np.empty((len(columns), len(q_labels)), dtype=np.int32)
    g_codes = np.empty((len(columns), len(g_labels)), dtype=np.int32)
    for row, column in enumerate(columns):
        if shared:
            q_codes[row] = g_codes[row] = np.unique(q_labels[:, column], return_inverse=True)[1]
        else:
            _, codes = np.unique(np.concatenate([q_labels[:, column], g_labels[:, column]]), return_inverse=True)
            q_codes[row], g_codes[row] = codes[: len(q_labels)], codes[len(q_labels) :]
    return q_codes, g_codes


def _to_numpy(value: Any) -> np.ndarray:
    # Torch tensors (possibly on GPU, possibly requiring grad) without importing torch here.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if value.is_floating_point():  # float16/bfloat16 from AMP have no (or no exact) numpy twin
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def as_embeddings(value: Any, name: str) -> np.ndarray:
    """A contiguous float32 ``(N, D)`` array from numpy or torch input; ``ValueError`` naming ``name`` otherwise."""
    array = _to_numpy(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return array


def as_labels(value: Any, name: str, expected_rows: int) -> np.ndarray:
    """An int64 ``(N, L)`` label array (``(N,)`` becomes one level) with ``expected_rows`` rows."""
    array = _to_numpy(value)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, L) with L >= 1 levels, got {array.shape}")
    if array.shape[0] != expected_rows:
        raise ValueError(f"{name} has {array.shape[0]} rows but there are {expected_rows} embeddings")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def resolve_schema(schema: LabelSchema | Sequence[str] | None, num_columns: int) -> LabelSchema:
    """The level names of ``num_columns`` label columns: the given schema (checked) or the default naming."""
    if schema is None:
        if num_columns == len(DEFAULT_LEVELS):
            return LabelSchema(DEFAULT_LEVELS)
        if num_columns == 1:
            return LabelSchema(("fine",))
        return LabelSchema(tuple(f"level{k}" for k in range(num_columns)))
    if not isinstance(schema, LabelSchema):
        if isinstance(schema, str):
            schema = [schema]
        schema = LabelSchema(tuple(schema))
    if schema.num_levels != num_columns:
        raise ValueError(
            f"schema has {schema.num_levels} levels ({', '.join(schema.levels)}) "
            f"but the labels have {num_columns} columns"
        )
    return schema


def check_report_ks(ks: Sequence[int]) -> list[int]:
    """Validate the K values of a report: positive integers, at least one, none repeated (they name columns)."""
    ks = check_ks(ks)
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a value, got {ks}")
    return ks


def _warn_if_not_normalised(embeddings: np.ndarray, name: str) -> None:
    if embeddings.size == 0:
        return
    norms = np.linalg.norm(embeddings, axis=1)
    worst = float(np.abs(norms - 1.0).max())
    if worst > _NORM_TOLERANCE:
        logger.warning(
            "%s is not L2-normalised (a norm is off by %.3g); ranking by raw inner product, not cosine",
            name,
            worst,
        )


def evaluate_chance(
    query_labels: Any,
    dim: int,
    schema: LabelSchema | Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    seed: int = 0,
) -> EvaluationReport:
    """The leave-one-out metrics of random unit vectors for the same labels: the chance level of each metric.

    A number means little without it: R@1 of 60% is excellent with 100 balanced classes and poor with 2, and
    coarse levels with few large classes have high chance levels. Seeded, so reports are reproducible.
    """
    labels = _to_numpy(query_labels)
    noise = np.random.default_rng(seed).standard_normal((len(labels), int(dim))).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return evaluate_embeddings(noise, labels, schema=schema, ks=ks)
