"""Calibration of granularity thresholds: one cosine-similarity threshold per label level.

Cross-Scale Learning makes similarity fall like the markings of a ruler: same fine class > same
middle class > same coarse class > different. A search "at granularity middle" therefore needs one
number per level, the similarity above which a hit most likely shares the query's class at that
level. This module chooses those numbers from labelled validation data, so that
``score >= threshold`` best predicts "same label at this level" over every (query, gallery item) pair.

How (exact counts, bounded memory):

* The candidate thresholds are the ``bins`` edges ``t_j = -1 + 2j / bins`` (``j = 0 .. bins - 1``) of
  a fine grid over [-1, 1]; ``bins`` is a power of two (default 8192, a step of about 2.4e-4). Each
  pair's float32 score goes into the bin ``j`` with ``t_j <= score < t_{j+1}``, computed as
  ``floor(score * bins / 2) + bins / 2``, which is exact for float32 scores and power-of-two ``bins``
  (no rounding), so "pairs with ``score >= t_j``" is a suffix sum of the histogram, with exactly the
  comparison that :mod:`indexing.granularity` applies at search time. Scores outside [-1, 1]
  (rounding on (anti)duplicates) go to the end bins.
* Queries are processed in chunks: a chunk's similarities to the whole gallery are computed, binned,
  and counted (all pairs once, positive pairs once per level) with ``np.bincount``; only the
  ``(levels + 1, bins)`` int64 histograms survive a chunk, so chunking never changes the result.
* Precision, recall and F1 at every candidate follow from suffix sums of the histograms, and the
  objective picks one candidate per level. The optimum is therefore exact over the grid (exact pair
  counts at each candidate threshold); between two grid edges it is not searched.

Cost: time ``O(Q * G * (D + L))`` (one float32 matmul plus a few passes per pair) and memory
``O(chunk * G)`` bytes for the chunk (about 21 bytes per pair: float32 scores, float64 and int64 bin
buffers, a bool mask; plus 8 bytes per positive pair while a level is counted) plus ``O(L * bins)``
for the histograms, independent of the number of queries. Measured: about 13M pairs/s at D = 512 with
three levels on two CPU cores (the matmul is about 45% of it).
The default chunk holds about 4M pairs (~90 MB). For a very large gallery, subsample the validation
queries: the count of pairs, not of queries, is what makes the estimate stable.

Objectives: ``"f1"`` (default) takes the threshold with the best F1 (on a plateau of equal F1, the
middle of the first plateau, i.e. the middle of the similarity gap between the classes);
``"precision>=P"`` takes the lowest threshold whose precision reaches ``P`` (the highest recall at
that precision). When the per-level optima break the ruler order (fine >= middle >= coarse), the
thresholds are chosen jointly instead: the ordered set that maximises the sum of the per-level
objective (F1, or recall among thresholds meeting the precision target) is found exactly by dynamic
programming over the grid, and every level it moved is marked ``clamped`` with its raw optimum kept.
With nested labels a precision target never needs this (a coarser level's positives include the finer
level's, so its precision is at least as high at every threshold); F1 optima can cross, e.g. when a fine
level has few positives.

Diagnostics: every calibration from :func:`thresholds_from_counts` carries
:class:`~indexing.calibration_diagnostics.CalibrationDiagnostics` read off the same histograms (score
quantiles and AUC per level, the score band, and warnings when the thresholds are untrustworthy: low F1
or precision, heavily overlapping classes, squeezed scores, crowded thresholds), stored with the
thresholds in the index manifest. Thresholds are returned whatever the warnings say; judging them is
the caller's (the CLI prints the warnings).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing.calibration_diagnostics import (
    QUANTILES,
    CalibrationDiagnostics,
    CalibrationWarning,
    DiagnosticLimits,
    diagnose,
)
from retrieval.data.labels import LabelSchema
from retrieval.evaluation.protocols import as_embeddings, as_labels, resolve_schema

__all__ = [
    "DEFAULT_BINS",
    "Calibration",
    "LevelThreshold",
    "PairCounts",
    "calibrate_thresholds",
    "count_pairs",
    "parse_objective",
    "thresholds_from_counts",
]

logger = logging.getLogger(__name__)

#: Default number of candidate thresholds over [-1, 1] (a power of two: binning is then exact).
DEFAULT_BINS = 8192
#: Pairs per chunk when no batch size is given: about 90 MB of working memory.
_PAIRS_PER_CHUNK = 1 << 22
_MAX_BINS = 1 << 24  # edges stay exactly representable in float32
_NORM_TOLERANCE = 1e-3
_PRECISION_OBJECTIVE = re.compile(r"^\s*precision\s*>=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class LevelThreshold:
    """The calibrated threshold of one label level and how well it separates that level's pairs.

    Attributes:
        level: label level name (from the schema).
        threshold: cosine similarity; a hit with ``score >= threshold`` is predicted to share the
            query's class at this level.
        precision: fraction of the pairs at or above the threshold that share the class (0 when none is).
        recall: fraction of the pairs sharing the class that are at or above the threshold.
        f1: harmonic mean of precision and recall.
        positives: number of calibration pairs that share the class at this level.
        pairs: number of calibration pairs (query, gallery item), self-pairs excluded.
        raw_threshold: the level's own optimum before the ruler order was enforced.
        clamped: True when enforcing the ruler order moved the threshold away from ``raw_threshold``.
    """

    level: str
    threshold: float
    precision: float
    recall: float
    f1: float
    positives: int
    pairs: int
    raw_threshold: float
    clamped: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "raw_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and -1.0 <= value <= 1.0):
                raise ValueError(f"level {self.level!r}: {name} must be a number in [-1, 1], got {value!r}")
        for name in ("precision", "recall", "f1"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"level {self.level!r}: {name} must be a number in [0, 1], got {value!r}")
        counts_are_ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.positives, self.pairs))
        if not counts_are_ints or not 0 <= self.positives <= self.pairs:
            raise ValueError(f"level {self.level!r}: need 0 <= positives <= pairs, got {self.positives}/{self.pairs}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return {
            "level": self.level,
            "threshold": float(self.threshold),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "f1": float(self.f1),
            "positives": int(self.positives),
            "pairs": int(self.pairs),
            "raw_threshold": float(self.raw_threshold),
            "clamped": bool(self.clamped),
        }


@dataclass(frozen=True)
class Calibration:
    """Thresholds for every label level, finest first, in ruler order (non-increasing).

    Attributes:
        levels: one :class:`LevelThreshold` per label level, finest first.
        objective: the objective that chose them (``"f1"`` or ``"precision>=P"``).
        bins: number of candidate thresholds over [-1, 1] (the grid resolution is ``2 / bins``).
        diagnostics: how far the thresholds can be trusted (score quantiles, AUC, warnings), or ``None`` for a
            calibration stored before diagnostics existed or built by hand.
        query_encoder_id: the query encoder the thresholds were fitted for when it is not the index's own (a
            student distilled into its space, whose queries score lower against the gallery), else ``None``.

    Raises:
        ValueError: on construction, with no level, a repeated level name, thresholds that increase from a finer
            level to a coarser one, an invalid objective, or diagnostics of other levels.
    """

    levels: tuple[LevelThreshold, ...]
    objective: str = "f1"
    bins: int = DEFAULT_BINS
    diagnostics: CalibrationDiagnostics | None = None
    query_encoder_id: str | None = None

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        object.__setattr__(self, "levels", levels)
        if not levels:
            raise ValueError("a calibration needs at least one level")
        names = [entry.level for entry in levels]
        if len(set(names)) != len(names):
            raise ValueError(f"calibration levels must be unique, got {names}")
        for finer, coarser in itertools.pairwise(levels):
            if coarser.threshold > finer.threshold:
                raise ValueError(
                    f"thresholds break the ruler order: {coarser.level} ({coarser.threshold:.6g}) is above "
                    f"{finer.level} ({finer.threshold:.6g}); a coarser level cannot be stricter than a finer one"
                )
        parse_objective(self.objective)
        _check_bins(self.bins)
        if self.diagnostics is not None and [d.level for d in self.diagnostics.levels] != names:
            raise ValueError(
                f"diagnostics of levels {[d.level for d in self.diagnostics.levels]} do not match the levels {names}"
            )

    @property
    def level_names(self) -> list[str]:
        """Level names, finest first."""
        return [entry.level for entry in self.levels]

    @property
    def thresholds(self) -> dict[str, float]:
        """``{level: threshold}``, finest first: the form the index manifest stores."""
        return {entry.level: float(entry.threshold) for entry in self.levels}

    @property
    def warnings(self) -> tuple[CalibrationWarning, ...]:
        """Reasons to distrust the thresholds (empty when there are none or no diagnostics were computed)."""
        return () if self.diagnostics is None else self.diagnostics.warnings

    @property
    def clamped(self) -> bool:
        """True when the ruler order had to be enforced on the per-level optima."""
        return any(entry.clamped for entry in self.levels)

    def level(self, name: str) -> LevelThreshold:
        """The entry of level ``name``."""
        for entry in self.levels:
            if entry.level == name:
                return entry
        raise ValueError(f"unknown granularity {name!r}; calibrated levels are {', '.join(self.level_names)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the index manifest (``"diagnostics"`` only when computed)."""
        payload: dict[str, Any] = {
            "objective": self.objective,
            "bins": int(self.bins),
            "levels": [e.to_dict() for e in self.levels],
        }
        if self.diagnostics is not None:
            payload["diagnostics"] = self.diagnostics.to_dict()
        if self.query_encoder_id is not None:
            payload["query_encoder_id"] = self.query_encoder_id
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict` output.

        Payloads written before diagnostics existed (no ``"diagnostics"`` key) load with ``diagnostics=None``.

        Raises:
            ValueError: a payload that is not a calibration (missing or unknown keys, wrong types, broken ruler order).
        """
        if not isinstance(payload, Mapping) or not isinstance(payload.get("levels"), list):
            raise ValueError("a calibration must be a mapping with a 'levels' list")
        unknown = set(payload) - {"objective", "bins", "levels", "diagnostics", "query_encoder_id"}
        if unknown:
            raise ValueError(f"unknown calibration keys: {sorted(unknown)}")
        fields = set(LevelThreshold.__dataclass_fields__)
        entries = []
        for position, item in enumerate(payload["levels"]):
            if not isinstance(item, Mapping) or set(item) - fields or "level" not in item:
                raise ValueError(f"calibration level {position} must be a mapping with keys from {sorted(fields)}")
            try:
                entries.append(LevelThreshold(**dict(item)))
            except TypeError as exc:
                raise ValueError(f"calibration level {position}: {exc}") from exc
        diagnostics = payload.get("diagnostics")
        return cls(
            tuple(entries),
            objective=str(payload.get("objective", "f1")),
            bins=payload.get("bins", DEFAULT_BINS),
            diagnostics=None if diagnostics is None else CalibrationDiagnostics.from_dict(diagnostics),
            query_encoder_id=None if payload.get("query_encoder_id") is None else str(payload["query_encoder_id"]),
        )

    def format_table(self) -> str:
        """A plain-text table for the CLI, with a note on levels moved to keep the ruler order.

        With diagnostics, an AUC column and a second table of score percentiles (same-class and other pairs)
        follow, and the score band; the warnings themselves are left to the caller to show (``warnings``).
        """
        diagnostics = self.diagnostics
        header = ("level", "threshold", "precision", "recall", "F1", *(("AUC",) if diagnostics else ()))
        header = (*header, "positives", "pairs")
        rows = []
        for e in self.levels:
            auc = () if diagnostics is None else (_number(diagnostics.level(e.level).auc, 3),)
            rows.append(
                (
                    e.level,
                    f"{e.threshold:.4f}" + ("*" if e.clamped else ""),
                    f"{e.precision:.3f}",
                    f"{e.recall:.3f}",
                    f"{e.f1:.3f}",
                    *auc,
                    f"{e.positives:,}",
                    f"{e.pairs:,}",
                )
            )
        lines = [f"objective: {self.objective} (grid step {2 / self.bins:.2g})", *_aligned([header, *rows])]
        for e in self.levels:
            if e.clamped:
                lines.append(f"* {e.level}: moved from its own optimum {e.raw_threshold:.4f} to keep the ruler order")
        if diagnostics is not None:
            scores = [("score percentiles", "same class p5 / p50 / p95", "other pairs p5 / p50 / p95")]
            for d in diagnostics.levels:
                scores.append((d.level, _spread(d.positive_quantiles), _spread(d.negative_quantiles)))
            low, high = diagnostics.band
            lines += [
                *_aligned(scores),
                f"score band {low:.4f} to {high:.4f} (width {diagnostics.band_width:.4f}): 5th percentile of all "
                f"pairs to 95th of same-{self.levels[0].level} pairs",
            ]
        return "\n".join(lines)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of right-aligned columns (the first left-aligned), two spaces apart."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        lines.append("  ".join(cells).rstrip())
    return lines


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(quantiles: tuple[float, ...] | None) -> str:
    """The 5th, 50th and 95th percentiles of a tuple over :data:`~indexing.calibration_diagnostics.QUANTILES`."""
    if quantiles is None:
        return "none"
    return " / ".join(f"{quantiles[QUANTILES.index(p)]:.4f}" for p in (5, 50, 95))


@dataclass(frozen=True)
class PairCounts:
    """Histograms of (query, gallery item) similarities over the candidate grid.

    Attributes:
        levels: level names, finest first.
        total: ``(bins,)`` int64, pairs whose score falls in each bin.
        positives: ``(L, bins)`` int64, pairs in each bin that share the class at each level.
    """

    levels: tuple[str, ...]
    total: np.ndarray
    positives: np.ndarray

    @property
    def bins(self) -> int:
        return int(self.total.shape[0])

    @property
    def edges(self) -> np.ndarray:
        """``(bins,)`` float64 candidate thresholds ``t_j = -1 + 2j / bins``; bin ``j`` holds ``t_j <= s < t_{j+1}``."""
        return _edges(self.bins)

    def at_or_above(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs with ``score >= t_j`` per candidate: ``(bins,)`` all pairs and ``(L, bins)`` positive pairs."""
        predicted = np.cumsum(self.total[::-1])[::-1]
        true_positives = np.cumsum(self.positives[:, ::-1], axis=1)[:, ::-1]
        return predicted, true_positives


def parse_objective(objective: str) -> float | None:
    """Validate an objective; return the precision target of ``"precision>=P"``, or ``None`` for ``"f1"``."""
    if not isinstance(objective, str):
        raise ValueError(f"objective must be a string, got {type(objective).__name__}")
    if objective.strip().lower() == "f1":
        return None
    match = _PRECISION_OBJECTIVE.match(objective.lower())
    if match is None or not 0.0 < float(match.group(1)) <= 1.0:
        raise ValueError(f"unknown objective {objective!r}; use 'f1' or 'precision>=P' with 0 < P <= 1")
    return float(match.group(1))


def count_pairs(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any | None = None,
    gallery_labels: Any | None = None,
    schema: LabelSchema | Sequence[str] | None = None,
    *,
    bins: int = DEFAULT_BINS,
    batch_size: int | None = None,
    query_in_gallery: Any | None = None,
) -> PairCounts:
    """Histogram every (query, gallery item) similarity, all pairs and positive pairs per level.

    Args:
        query_emb: ``(Q, D)`` L2-normalised query embeddings (compared in float32).
        query_labels: ``(Q, L)`` integer labels, finest level first (``(Q,)`` means one level).
        gallery_emb: ``(G, D)`` gallery embeddings, or ``None`` to pair the queries with each other
            (leave-one-out: self-pairs are excluded).
        gallery_labels: ``(G, L)`` gallery labels; required exactly when ``gallery_emb`` is given.
        schema: level names of the label columns; ``None`` uses fine/middle/coarse for 3 columns,
            ``fine`` for 1, else ``level0, level1, ...``.
        bins: candidate thresholds over [-1, 1]; a power of two between 16 and 2**24.
        batch_size: queries per chunk; default about 4M pairs per chunk.
        query_in_gallery: ``(Q,)`` gallery index of each query when the queries are also gallery
            items (-1 where absent); those self-pairs are excluded.

    Raises:
        ValueError: mismatched shapes, non-integer labels, non-finite embeddings or bad options.
    """
    queries = as_embeddings(query_emb, "query_emb")
    q_labels = as_labels(query_labels, "query_labels", len(queries))
    if gallery_emb is None:
        if gallery_labels is not None or query_in_gallery is not None:
            raise ValueError(
                "gallery_labels and query_in_gallery need gallery_emb; pass none of them for leave-one-out"
            )
        if len(queries) < 2:
            raise ValueError("leave-one-out calibration needs at least 2 items")
        gallery, g_labels, self_index = queries, q_labels, np.arange(len(queries), dtype=np.int64)
    else:
        if gallery_labels is None:
            raise ValueError("gallery_emb was given without gallery_labels; pass both or neither")
        gallery = as_embeddings(gallery_emb, "gallery_emb")
        g_labels = as_labels(gallery_labels, "gallery_labels", len(gallery))
        if gallery.shape[1] != queries.shape[1] or g_labels.shape[1] != q_labels.shape[1]:
            raise ValueError(
                f"queries {queries.shape}/{q_labels.shape} and gallery {gallery.shape}/{g_labels.shape} "
                "must share the embedding dimension and the number of label levels"
            )
        self_index = _as_self_index(query_in_gallery, len(queries), len(gallery))
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError("calibration needs at least one query and one gallery item")
    names = resolve_schema(schema, q_labels.shape[1]).levels
    bins = _check_bins(bins)
    rows = _check_batch_size(batch_size, len(gallery))
    for array, name in ((queries, "query_emb"), (gallery, "gallery_emb")):
        _warn_if_not_normalised(array, name)

    total = np.zeros(bins + 1, dtype=np.int64)  # the extra bin collects excluded self-pairs
    positives = np.zeros((len(names), bins + 1), dtype=np.int64)
    scores = np.empty((rows, len(gallery)), dtype=np.float32)
    scaled = np.empty(scores.shape, dtype=np.float64)
    index = np.empty(scores.shape, dtype=np.int64)
    same = np.empty(scores.shape, dtype=bool)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        chunk = slice(0, stop - start)
        np.matmul(queries[start:stop], gallery.T, out=scores[chunk])
        _bin_index(scores[chunk], bins, scaled[chunk], index[chunk])
        local = np.flatnonzero(self_index[start:stop] >= 0)
        index[local, self_index[start:stop][local]] = bins
        total += np.bincount(index[chunk].ravel(), minlength=bins + 1)
        for level in range(len(names)):
            np.equal(q_labels[start:stop, level, None], g_labels[None, :, level], out=same[chunk])
            positives[level] += np.bincount(index[chunk][same[chunk]], minlength=bins + 1)
    return PairCounts(levels=tuple(names), total=total[:bins], positives=positives[:, :bins])


def thresholds_from_counts(
    counts: PairCounts, objective: str = "f1", *, limits: DiagnosticLimits | None = None
) -> Calibration:
    """Choose one threshold per level from pair histograms (see the module docstring for the rules).

    The result carries diagnostics (:func:`indexing.calibration_diagnostics.diagnose`) against ``limits``
    (default :class:`~indexing.calibration_diagnostics.DiagnosticLimits`).

    Raises:
        ValueError: a level with no positive pair, or a precision target that no (ordered) set of thresholds reaches.
    """
    target = parse_objective(objective)
    predicted, true_positives = counts.at_or_above()
    pairs = int(predicted[0])
    positives = true_positives[:, 0]
    for name, count in zip(counts.levels, positives, strict=True):
        if count == 0:
            raise ValueError(f"no calibration pair shares a {name} class; cannot calibrate level {name!r}")
    precision = true_positives / np.maximum(predicted, 1)  # 0 where no pair is at or above the threshold
    recall = true_positives / positives[:, None]
    f1 = 2.0 * true_positives / (predicted[None, :] + positives[:, None])
    if target is None:
        objective_values = f1
        raw = np.array([_middle_of_first_best(row) for row in f1])
    else:
        feasible = (true_positives > 0) & (precision >= target)
        objective_values = np.where(feasible, recall, -np.inf)
        for name, row, prec in zip(counts.levels, feasible, precision, strict=True):
            if not row.any():
                best = int(np.argmax(prec))
                raise ValueError(
                    f"level {name!r} never reaches precision {target:g} (best {prec[best]:.3f} at similarity "
                    f"{_edges(counts.bins)[best]:.4f}); lower the target or use objective 'f1'"
                )
        raw = np.argmax(feasible, axis=1)  # the lowest threshold meeting the target
    chosen = raw if bool(np.all(np.diff(raw) <= 0)) else _best_ordered(objective_values, counts.levels, target)
    edges = _edges(counts.bins)
    entries = tuple(
        LevelThreshold(
            level=name,
            threshold=float(edges[j]),
            precision=float(precision[k, j]),
            recall=float(recall[k, j]),
            f1=float(f1[k, j]),
            positives=int(positives[k]),
            pairs=pairs,
            raw_threshold=float(edges[raw[k]]),
            clamped=bool(j != raw[k]),
        )
        for k, (name, j) in enumerate(zip(counts.levels, chosen, strict=True))
    )
    calibration = Calibration(
        entries,
        objective=objective.strip().lower().replace(" ", ""),
        bins=counts.bins,
        diagnostics=diagnose(counts, entries, limits),
    )
    if calibration.clamped:
        logger.warning(
            "per-level optima broke the ruler order (%s); thresholds chosen jointly instead: %s",
            ", ".join(f"{e.level} {e.raw_threshold:.4f}" for e in entries),
            ", ".join(f"{e.level} {e.threshold:.4f}" for e in entries),
        )
    return calibration


def calibrate_thresholds(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any | None = None,
    gallery_labels: Any | None = None,
    schema: LabelSchema | Sequence[str] | None = None,
    *,
    objective: str = "f1",
    bins: int = DEFAULT_BINS,
    batch_size: int | None = None,
    query_in_gallery: Any | None = None,
) -> Calibration:
    """Calibrate one similarity threshold per label level on labelled validation data.

    ``count_pairs`` followed by ``thresholds_from_counts``; see those for the arguments. The
    objective is validated before any similarity is computed.
    """
    parse_objective(objective)
    counts = count_pairs(
        query_emb,
        query_labels,
        gallery_emb,
        gallery_labels,
        schema,
        bins=bins,
        batch_size=batch_size,
        query_in_gallery=query_in_gallery,
    )
    return thresholds_from_counts(counts, objective)


def _edges(bins: int) -> np.ndarray:
    return (np.arange(bins, dtype=np.float64) - bins // 2) / (bins // 2)


def _bin_index(scores: np.ndarray, bins: int, scaled: np.ndarray, out: np.ndarray) -> None:
    """Write ``floor(s * bins/2) + bins/2`` clipped to ``[0, bins)``: exact for float32 ``s`` and power-of-two bins.

    Scaling a float32 by a power of two in float64 and flooring are exact, so the bin agrees with
    ``s >= t_j`` for every edge (adding 1 before flooring would round tiny negative scores up to 0).
    """
    half = bins // 2
    np.multiply(scores, float(half), out=scaled, dtype=np.float64)
    np.floor(scaled, out=scaled)
    np.clip(scaled, -half, half - 1, out=scaled)
    np.copyto(out, scaled, casting="unsafe")
    out += half


def _middle_of_first_best(values: np.ndarray) -> int:
    """Index in the middle of the first run of maximal values (the centre of a similarity gap)."""
    best = np.flatnonzero(values == values.max())
    breaks = np.flatnonzero(np.diff(best) > 1)
    last = best[breaks[0]] if breaks.size else best[-1]
    return int((best[0] + last) // 2)


def _best_ordered(values: np.ndarray, levels: Sequence[str], target: float | None) -> np.ndarray:
    """Candidate per level maximising ``sum_k values[k, j_k]`` subject to ``j_0 >= j_1 >= ...`` (finest first).

    Dynamic programming from the coarsest level: ``V_last = values[last]`` and
    ``V_k(j) = values[k, j] + max_{j' <= j} V_{k+1}(j')``; a running maximum (with the position that
    attains it) gives each step in ``O(bins)``, so the exact joint optimum costs ``O(L * bins)``.
    """
    num_levels, width = values.shape
    positions = np.arange(width)
    best_below = np.zeros((num_levels, width), dtype=np.int64)  # argmax_{j' <= j} V_{k}(j')
    current = values[-1].astype(np.float64)
    for k in range(num_levels - 2, -1, -1):
        running = np.maximum.accumulate(current)
        best_below[k + 1] = np.maximum.accumulate(np.where(current == running, positions, 0))
        current = values[k] + running
    if not np.isfinite(current.max()):
        goal = "the objective" if target is None else f"precision {target:g}"
        raise ValueError(
            f"no thresholds in ruler order ({' >= '.join(levels)}) all reach {goal}; "
            "lower the target or use objective 'f1'"
        )
    chosen = np.empty(num_levels, dtype=np.int64)
    # Same tie rules as the per-level choice: the lowest candidate for a precision target, the middle of
    # the first plateau for F1; each coarser level then takes the highest of its best candidates (closest
    # to the finer level's threshold).
    chosen[0] = int(np.argmax(current)) if target is not None else _middle_of_first_best(current)
    for k in range(1, num_levels):
        chosen[k] = best_below[k, chosen[k - 1]]
    return chosen


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or not 16 <= bins <= _MAX_BINS:
        raise ValueError(f"bins must be a power of two between 16 and {_MAX_BINS}, got {bins!r}")
    if bins & (bins - 1):
        raise ValueError(f"bins must be a power of two (binning is then exact), got {bins}")
    return int(bins)


def _check_batch_size(batch_size: int | None, gallery_size: int) -> int:
    if batch_size is None:
        return max(1, _PAIRS_PER_CHUNK // max(gallery_size, 1))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _as_self_index(value: Any | None, num_queries: int, gallery_size: int) -> np.ndarray:
    if value is None:
        return np.full(num_queries, -1, dtype=np.int64)
    index = np.asarray(value)
    if index.shape != (num_queries,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"query_in_gallery must be ({num_queries},) integer gallery indices, got {index.shape}")
    if index.size and (index.min() < -1 or index.max() >= gallery_size):
        raise ValueError(f"query_in_gallery must lie in [-1, {gallery_size})")
    return index.astype(np.int64)


def _warn_if_not_normalised(embeddings: np.ndarray, name: str) -> None:
    if embeddings.size and float(np.abs(np.linalg.norm(embeddings, axis=1) - 1.0).max()) > _NORM_TOLERANCE:
        logger.warning("%s is not L2-normalised; thresholds on raw inner products are not cosine similarities", name)
