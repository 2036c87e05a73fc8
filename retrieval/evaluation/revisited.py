"""The Revisited Oxford / Paris protocol: mAP and mP@k in the Easy, Medium and Hard setups.

Radenović et al. (CVPR 2018) label every database image, per query, as *easy*, *hard* or *junk*
(or irrelevant). A setup decides which labels count as positives and which are removed from the
ranking as if they were not there:

========  ===============  ==============
setup     positives        junk
========  ===============  ==============
Easy      easy             junk ∪ hard
Medium    easy ∪ hard      junk
Hard      hard             junk ∪ easy
========  ===============  ==============

AP follows the official ``compute_ap``: junk is removed from the ranking, then for the j-th positive
(0-based) at adjusted 0-based rank r the precision before and after it, ``p0 = 1 if r == 0 else j / r``
and ``p1 = (j + 1) / (r + 1)``, are averaged (a trapezoid under the precision-recall curve) and
``AP = sum (p0 + p1) / 2 / n_positives``. This is not the step-wise AP of
:func:`~retrieval.evaluation.metrics.average_precision`, and the published numbers need this one.
mP@k uses the 1-based adjusted ranks ``pos`` of the positives: ``kq = min(max(pos), k)`` and
``P = #(pos <= kq) / kq``, so a query with fewer than k positives is not capped below 1. A query with
no positive in a setup has neither and is left out of that setup's means (``counted`` says how many
took part).

Everything is pure numpy. Rankings come from :func:`~retrieval.evaluation.metrics.rank_by_similarity`
(descending similarity, ties to the lower index), so database images win ties against the +1M
distractors, which are appended after them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from retrieval.evaluation.metrics import RankWorkspace, check_ks, rank_by_similarity

__all__ = [
    "REVISITED_KS",
    "SETUPS",
    "GroundTruthLike",
    "RevisitedReport",
    "adjusted_positive_ranks",
    "evaluate_revisited",
    "precision_at_ks",
    "revisited_ap",
    "revisited_ap_from_scores",
    "setup_judgements",
    "trapezoid_ap",
]

SETUPS: tuple[str, ...] = ("easy", "medium", "hard")
REVISITED_KS: tuple[int, ...] = (1, 5, 10)
"""The mP@k cut-offs the Revisited paper reports."""

_DISTRACTOR_BLOCK = 1 << 16  # distractor rows multiplied at a time (bounds reads from a memory-mapped file)


class GroundTruthLike(Protocol):
    """One query's judgements: ``easy``, ``hard`` and ``junk`` database indices (e.g. ``QueryGroundTruth``)."""

    @property
    def easy(self) -> Any: ...

    @property
    def hard(self) -> Any: ...

    @property
    def junk(self) -> Any: ...


def setup_judgements(ground_truth: GroundTruthLike | Mapping[str, Any], setup: str) -> tuple[np.ndarray, np.ndarray]:
    """The sorted, distinct ``(positives, junk)`` database indices of one query in one setup.

    Args:
        ground_truth: an object with ``easy``, ``hard`` and ``junk`` attributes, or a dict with those keys
            (an entry of the official ``gnd`` list).
        setup: ``"easy"``, ``"medium"`` or ``"hard"``.

    Raises:
        ValueError: an unknown setup, or judgements that are not 1-D integer arrays.
    """
    easy, hard, junk = (_judgement(ground_truth, key) for key in ("easy", "hard", "junk"))
    if setup == "easy":
        return np.unique(easy), np.union1d(junk, hard)
    if setup == "medium":
        return np.union1d(easy, hard), np.unique(junk)
    if setup == "hard":
        return np.unique(hard), np.union1d(junk, easy)
    raise ValueError(f"unknown setup {setup!r}; setups are {', '.join(SETUPS)}")


def _judgement(ground_truth: Any, key: str) -> np.ndarray:
    value = ground_truth[key] if isinstance(ground_truth, Mapping) else getattr(ground_truth, key)
    array = np.asarray(value)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ground truth {key!r} must be a 1-D array of integer database indices")
    return array.astype(np.int64, copy=False)


def adjusted_positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives found in ``ranking`` once the junk is removed, increasing.

    A positive's rank drops by the number of junk items ranked *strictly* before it. Positives missing
    from ``ranking`` (a truncated list) are simply absent from the result, as in the official code.
    """
    ranking = np.asarray(ranking)
    if ranking.ndim != 1:
        raise ValueError(f"ranking must be 1-D (one query), got shape {ranking.shape}")
    positions = np.flatnonzero(np.isin(ranking, positives))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    return positions - np.searchsorted(junk_positions, positions, side="left")


def trapezoid_ap(ranks: np.ndarray, num_positives: int) -> float:
    """The official trapezoid AP from adjusted 0-based positive ranks (increasing); NaN with no positives."""
    if num_positives == 0:
        return float("nan")
    ranks = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(ranks), dtype=np.float64)
    before = np.ones_like(ranks)
    np.divide(j, ranks, out=before, where=ranks > 0)  # p0 = j / r, and 1 at r = 0 (where j = 0 too)
    after = (j + 1.0) / (ranks + 1.0)
    return float(((before + after) / 2.0).sum() / num_positives)


def precision_at_ks(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Official precision at each k from adjusted 0-based positive ranks; NaN when there are none.

    ``kq = min(max(pos), k)`` with 1-based ``pos``: a query whose positives all lie above k is scored on
    the ranks it could fill, so one with 2 positives at ranks 1 and 2 gets P@10 = 1.
    """
    ks = check_ks(ks)
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        return np.full(len(ks), np.nan)
    pos = ranks + 1
    deepest = int(pos.max())
    out = np.empty(len(ks), dtype=np.float64)
    for i, k in enumerate(ks):
        kq = min(deepest, k)
        out[i] = np.count_nonzero(pos <= kq) / kq
    return out


def revisited_ap(ranking: np.ndarray, positives: Any, junk: Any) -> float:
    """Official trapezoid AP of one query's ranking (database indices, most similar first).

    Args:
        ranking: ``(N,)`` database indices in rank order.
        positives: database indices counted as positives (duplicates count once).
        junk: database indices removed from the ranking before scoring.

    Returns:
        The AP, or NaN when there is no positive.
    """
    positives = np.unique(np.asarray(positives, dtype=np.int64))
    junk = np.unique(np.asarray(junk, dtype=np.int64))
    return trapezoid_ap(adjusted_positive_ranks(ranking, positives, junk), len(positives))


def revisited_ap_from_scores(scores: np.ndarray, positives: Any, junk: Any) -> float:
    """:func:`revisited_ap` of the ranking that ``(N,)`` similarities give (descending, ties to the lower index)."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one query), got shape {scores.shape}")
    return revisited_ap(rank_by_similarity(scores[None, :])[0], positives, junk)


@dataclass(frozen=True)
class RevisitedReport:
    """mAP and mP@k per setup of the Revisited protocol, as fractions in [0, 1].

    Attributes:
        setups: ``{setup: {metric: value}}`` for setups ``easy``, ``medium``, ``hard`` and metrics
            ``mAP``, ``mP@1``, ``mP@5``, ``mP@10`` (one ``mP@k`` per requested k); NaN where no query has a
            positive in that setup.
        num_queries: queries evaluated.
        counted: ``{setup: n}``, queries with at least one positive in that setup (the others are left
            out of its means).
        num_database: database size ranked against, distractors included.
    """

    setups: dict[str, dict[str, float]]
    num_queries: int
    counted: dict[str, int] = field(default_factory=dict)
    num_database: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "setups", {s: dict(m) for s, m in self.setups.items()})
        object.__setattr__(self, "counted", {str(k): int(v) for k, v in self.counted.items()})
        names = self.metric_names
        for setup, metrics in self.setups.items():
            if list(metrics) != names:
                raise ValueError(f"setup {setup!r} has metrics {list(metrics)}, expected {names}")
        unknown = set(self.counted) - set(self.setups)
        if unknown:
            raise ValueError(f"counted names unknown setups {sorted(unknown)}")

    @property
    def metric_names(self) -> list[str]:
        """Metric names in column order, e.g. ``["mAP", "mP@1", "mP@5", "mP@10"]``."""
        return list(next(iter(self.setups.values()))) if self.setups else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: fractions as plain floats, NaN as ``None`` (JSON has no NaN)."""
        return {
            "setups": {
                setup: {name: None if math.isnan(value) else float(value) for name, value in metrics.items()}
                for setup, metrics in self.setups.items()
            },
            "num_queries": self.num_queries,
            "counted": dict(self.counted),
            "num_database": self.num_database,
        }

    def format_table(self, title: str | None = None) -> str:
        """Aligned plain-text table in percent: one row per setup, one column per metric, then ``queries``.

        Args:
            title: first line; the default names the protocol and the number of queries.
        """
        names = self.metric_names
        header = ["setup", *names, "queries"]
        rows = [
            [setup, *(_percent(metrics[n]) for n in names), str(self.counted.get(setup, ""))]
            for setup, metrics in self.setups.items()
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([cells[0].ljust(widths[0]), *rest]).rstrip()

        if title is None:
            title = f"Revisited protocol, metrics in % (trapezoid mAP, mP@k), {self.num_queries} queries"
        return "\n".join([title, line(header), "-" * len(line(header)), *(line(r) for r in rows)])


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


def evaluate_revisited(
    query_emb: Any,
    db_emb: Any,
    ground_truth: Sequence[GroundTruthLike | Mapping[str, Any]],
    ks: Sequence[int] = REVISITED_KS,
    batch_size: int = 8,
    *,
    distractors: Any | None = None,
) -> RevisitedReport:
    """Score query and database embeddings with the Revisited protocol in all three setups.

    Similarity is the float32 inner product (embeddings are expected L2-normalised). Each query ranks
    the whole database, then the distractors (the +1M setting) appended after it; ground-truth indices
    refer to the database only, so a distractor is never a positive or junk.

    Memory: ``batch_size`` queries are ranked at a time against all ``W = N + M`` items, with about
    ``16 x batch_size x W`` bytes of scores and sort keys plus ``8 x W`` for one inverse ranking:
    about 140 MB for the default 8 queries against ROxford5k+1M (W ~ 1.005 M), never a dense
    ``Q x W`` matrix. Distractors are multiplied in blocks of 65 536 rows, so a memory-mapped
    ``.npy`` file is streamed rather than loaded whole. Results do not depend on ``batch_size``.

    Args:
        query_emb: ``(Q, D)`` query embeddings (queries cropped to their boxes).
        db_emb: ``(N, D)`` database embeddings, in the order the ground-truth indices use.
        ground_truth: ``Q`` entries with ``easy``, ``hard`` and ``junk`` index arrays
            (``QueryGroundTruth`` or the official ``gnd`` dicts).
        ks: mP@k cut-offs, distinct positive integers.
        batch_size: queries ranked at a time.
        distractors: optional ``(M, D)`` distractor embeddings (may be a ``np.memmap``).

    Returns:
        A :class:`RevisitedReport`.

    Raises:
        ValueError: shapes that do not fit (rows vs ground truth, dimensions), non-finite values,
            indices outside the database, bad ``ks`` or ``batch_size``.
    """
    queries = _embeddings(query_emb, "query_emb")
    database = _embeddings(db_emb, "db_emb")
    extra = None if distractors is None else _embeddings(distractors, "distractors")
    ks = check_ks(ks)
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a value, got {ks}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ground_truth = list(ground_truth)
    if len(queries) != len(ground_truth):
        raise ValueError(f"query_emb has {len(queries)} rows but the ground truth has {len(ground_truth)} queries")
    if len(queries) == 0 or len(database) == 0:
        raise ValueError("query_emb and db_emb must each hold at least one row")
    for name, other in (("db_emb", database), ("distractors", extra)):
        if other is not None and other.shape[1] != queries.shape[1]:
            raise ValueError(
                f"query_emb has dimension {queries.shape[1]} but {name} has {other.shape[1]}; "
                "queries and database must live in the same embedding space"
            )
    judgements = _all_judgements(ground_truth, len(database))
    width = len(database) + (0 if extra is None else len(extra))

    num_queries = len(queries)
    ap = np.full((len(SETUPS), num_queries), np.nan)
    precision = np.full((len(SETUPS), num_queries, len(ks)), np.nan)
    rows = min(int(batch_size), num_queries)
    scores = np.empty((rows, width), dtype=np.float32)
    inverse = np.empty(width, dtype=np.int64)
    positions = np.arange(width, dtype=np.int64)
    workspace = RankWorkspace()
    for start in range(0, num_queries, rows):
        stop = min(start + rows, num_queries)
        chunk = scores[: stop - start]
        _similarities(queries[start:stop], database, extra, chunk)
        ranking = rank_by_similarity(chunk, workspace=workspace)
        for offset, order in enumerate(ranking):
            q = start + offset
            inverse[order] = positions  # inverse[item] = its 0-based rank
            for s, (positives, junk) in enumerate(judgements[q]):
                if positives.size == 0:
                    continue
                pos = np.sort(inverse[positives])
                ranks = pos - np.searchsorted(np.sort(inverse[junk]), pos, side="left")
                ap[s, q] = trapezoid_ap(ranks, len(positives))
                precision[s, q] = precision_at_ks(ranks, ks)

    setups: dict[str, dict[str, float]] = {}
    counted: dict[str, int] = {}
    for s, setup in enumerate(SETUPS):
        valid = ~np.isnan(ap[s])
        counted[setup] = int(valid.sum())
        metrics = {"mAP": float(ap[s, valid].mean()) if valid.any() else float("nan")}
        for i, k in enumerate(ks):
            metrics[f"mP@{k}"] = float(precision[s, valid, i].mean()) if valid.any() else float("nan")
        setups[setup] = metrics
    return RevisitedReport(setups=setups, num_queries=num_queries, counted=counted, num_database=width)


def _all_judgements(
    ground_truth: list[GroundTruthLike | Mapping[str, Any]], size: int
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per query, per setup: (positives, junk), checked against the database size."""
    out = []
    for q, entry in enumerate(ground_truth):
        try:
            per_setup = [setup_judgements(entry, setup) for setup in SETUPS]
        except (AttributeError, KeyError, ValueError) as exc:
            raise ValueError(f"ground truth of query {q}: {exc}") from None
        for indices in (index for pair in per_setup for index in pair):
            outside = indices[(indices < 0) | (indices >= size)]
            if outside.size:
                raise ValueError(
                    f"ground truth of query {q} names database index {outside[0]} outside [0, {size}) "
                    "(the database size)"
                )
        out.append(per_setup)
    return out


def _similarities(queries: np.ndarray, database: np.ndarray, extra: np.ndarray | None, out: np.ndarray) -> None:
    """Fill ``out`` with query x (database, then distractors) inner products, distractors in blocks."""
    n = len(database)
    out[:, :n] = queries @ database.T
    if extra is None:
        return
    for begin in range(0, len(extra), _DISTRACTOR_BLOCK):
        block = np.asarray(extra[begin : begin + _DISTRACTOR_BLOCK], dtype=np.float32)
        out[:, n + begin : n + begin + len(block)] = queries @ block.T


def _embeddings(value: Any, name: str) -> np.ndarray:
    """A 2-D real array with finite values, float32 unless it is a memory map (checked block by block)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    array = value if isinstance(value, np.memmap) else np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    if not isinstance(array, np.memmap):
        array = np.ascontiguousarray(array, dtype=np.float32)
    for begin in range(0, len(array), _DISTRACTOR_BLOCK):
        if not np.isfinite(array[begin : begin + _DISTRACTOR_BLOCK]).all():
            raise ValueError(f"{name} contains NaN or inf values")
    return array
