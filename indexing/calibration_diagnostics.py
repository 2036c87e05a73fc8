"""How far to trust calibrated thresholds: warnings and summary numbers read off the exact pair histograms.

A calibration always returns thresholds, even when the embedding cannot separate the classes: on real
photos an untrained encoder gave thresholds of 0.994 (fine) and 0.992 (coarse) with F1 0.13 and 0.18,
every similarity squeezed into 0.83-1.0, and nothing said that those numbers were useless. This module
looks at the same histograms the thresholds came from (:class:`indexing.calibration.PairCounts`) and says
what is wrong, per level, with numbers a person can check:

* **score quantiles** (5th, 25th, 50th, 75th, 95th percentile) of the positive pairs (same class at the
  level) and of the negative pairs (the other pairs). The ``p``-th percentile is the ``ceil(p n / 100)``-th
  smallest score, reported as the lower edge of its histogram bin (exact to the grid step ``2 / bins``).
* **AUC**, the probability that a random positive pair outscores a random negative one (the Mann-Whitney
  statistic), computed exactly from the histograms: pairs in one bin count as ties, worth one half. It is
  rank-based, so it does not depend on how many more negatives than positives there are, unlike precision.
* **score band**: from the 5th percentile of all pairs to the 95th percentile of the finest level's positive
  pairs, where (nearly) all the contrast between "unrelated" and "same object" lives. All thresholds fall
  inside it. (The spread of all pairs alone would not do: in a well-trained high-dimensional space the
  negatives, which are almost all pairs, crowd around 0 in a narrow band by themselves.)

Warnings (:class:`CalibrationWarning`, with a ``kind`` a program can test), with the defaults of
:class:`DiagnosticLimits` and why:

* ``low_precision`` (precision < 0.5) and ``low_f1`` (F1 < 0.5) at the chosen threshold: below one half,
  a hit tagged with the level is more often wrong than right, or most of the level's matches are missed or
  mislabelled.
* ``overlap`` (AUC < 0.85): below it, more than one (positive, negative) pair in seven is ordered the wrong
  way round, and since negatives usually outnumber positives by about the number of classes, even that
  much overlap swamps the positives above any threshold. Training (more epochs, more or more fitting
  labelled data) is the fix; whitening can help.
* ``squeezed`` (score band narrower than 0.25 in cosine similarity, absolute): all thresholds then sit in
  a sliver of [-1, 1], where small score shifts move hits across them; a query encoder other than the one
  calibrated (a distilled student, a float16 or int8 export) shifts scores by up to ``sqrt(2 (1 - c))``
  for a query embedding at cosine ``c`` from the original, e.g. 0.01 at ``c = 0.99995`` and 0.14 at
  ``c = 0.99``. The usual cause is anisotropy: every descriptor shares a large common component, which
  centring and whitening remove (``retrieval index build --whiten pca|learned``).
* ``crowded`` (adjacent thresholds closer than the larger of 5% of the score band and 0.01): thresholds
  spread like the markings of a ruler sit about ``band / (levels + 1)`` apart (25% of the band for three
  levels); at a fifth of that the two levels tag almost the same hits. The absolute floor, 0.01, is the
  score shift of a float16 query encoder (above), under which the order of two levels is noise.

Everything is computed from the ``(levels + 1, bins)`` histograms in ``O(levels * bins)``; no pair is
revisited.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # calibration imports this module; the types are only needed for annotations
    from indexing.calibration import LevelThreshold, PairCounts

__all__ = [
    "QUANTILES",
    "WARNING_KINDS",
    "CalibrationDiagnostics",
    "CalibrationWarning",
    "DiagnosticLimits",
    "LevelDiagnostics",
    "diagnose",
    "histogram_auc",
    "histogram_quantiles",
]

#: Percentiles reported for positive and negative pair scores (integers, so ranks are computed exactly).
QUANTILES: tuple[int, ...] = (5, 25, 50, 75, 95)
#: Percentiles that bound the score band: all pairs' low end, the finest level's positives' high end.
BAND_PERCENTILES = (5, 95)
#: Warning kinds, in the order they are reported (causes before their consequences).
WARNING_KINDS: tuple[str, ...] = ("squeezed", "overlap", "crowded", "low_precision", "low_f1")
_WHITEN_HINT = "retrieval index build --whiten pca|learned"


@dataclass(frozen=True)
class DiagnosticLimits:
    """The limits below which a warning is raised (see the module docstring for why these defaults).

    Attributes:
        min_f1: F1 at the chosen threshold below which ``low_f1`` is raised.
        min_precision: precision at the chosen threshold below which ``low_precision`` is raised.
        min_auc: AUC of positive against negative pair scores below which ``overlap`` is raised.
        min_band: width (in cosine similarity) of the score band below which ``squeezed`` is raised.
        crowded_fraction: adjacent thresholds closer than this fraction of the band width are ``crowded``...
        crowded_absolute: ...or closer than this absolute similarity, whichever is larger.
    """

    min_f1: float = 0.5
    min_precision: float = 0.5
    min_auc: float = 0.85
    min_band: float = 0.25
    crowded_fraction: float = 0.05
    crowded_absolute: float = 0.01

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 2.0:
                raise ValueError(f"diagnostic limit {item.name} must be a number in [0, 2], got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, payload: Any) -> DiagnosticLimits:
        known = {item.name for item in fields(cls)}
        if not isinstance(payload, Mapping) or set(payload) - known:
            raise ValueError(f"diagnostic limits must be a mapping with keys from {sorted(known)}")
        return cls(**dict(payload))


@dataclass(frozen=True)
class CalibrationWarning:
    """One reason to distrust a calibration.

    Attributes:
        kind: what is wrong: one of :data:`WARNING_KINDS` (``squeezed``, ``overlap``, ``crowded``,
            ``low_precision``, ``low_f1``).
        levels: the levels concerned (none for ``squeezed``, two adjacent ones for ``crowded``).
        message: one sentence for a person: the numbers, the limit, what to do.
    """

    kind: str
    levels: tuple[str, ...]
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if not (isinstance(self.kind, str) and self.kind and isinstance(self.message, str) and self.message):
            raise ValueError("a calibration warning needs a non-empty kind and message")
        if not all(isinstance(level, str) for level in self.levels):
            raise ValueError(f"calibration warning levels must be strings, got {self.levels!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": list(self.levels), "message": self.message}

    @classmethod
    def from_dict(cls, payload: Any) -> CalibrationWarning:
        if not isinstance(payload, Mapping) or set(payload) != {"kind", "levels", "message"}:
            raise ValueError("a calibration warning must be a mapping with keys kind, levels, message")
        if not isinstance(payload["levels"], list):
            raise ValueError("calibration warning levels must be a list")
        return cls(kind=payload["kind"], levels=tuple(payload["levels"]), message=payload["message"])


@dataclass(frozen=True)
class LevelDiagnostics:
    """Summary numbers of one level's positive and negative pair scores.

    Attributes:
        level: label level name.
        negatives: pairs that do not share the class at this level.
        auc: probability that a positive pair outscores a negative one (ties half), or ``None`` without
            positives or without negatives.
        positive_quantiles: the :data:`QUANTILES` percentiles of the positive pairs' scores (lower bin
            edges), or ``None`` without positives.
        negative_quantiles: the same for the negative pairs, or ``None`` without negatives.
    """

    level: str
    negatives: int
    auc: float | None
    positive_quantiles: tuple[float, ...] | None
    negative_quantiles: tuple[float, ...] | None

    def __post_init__(self) -> None:
        if isinstance(self.negatives, bool) or not isinstance(self.negatives, int) or self.negatives < 0:
            raise ValueError(f"level {self.level!r}: negatives must be a non-negative integer, got {self.negatives!r}")
        if self.auc is not None and not (
            isinstance(self.auc, int | float) and not isinstance(self.auc, bool) and 0.0 <= self.auc <= 1.0
        ):
            raise ValueError(f"level {self.level!r}: auc must be in [0, 1] or null, got {self.auc!r}")
        for name in ("positive_quantiles", "negative_quantiles"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            if len(value) != len(QUANTILES) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and -1.0 <= v <= 1.0 for v in value
            ):
                raise ValueError(f"level {self.level!r}: {name} must be {len(QUANTILES)} scores in [-1, 1]")
            if any(b < a for a, b in itertools.pairwise(value)):
                raise ValueError(f"level {self.level!r}: {name} must be non-decreasing")
            object.__setattr__(self, name, tuple(float(v) for v in value))

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "negatives": int(self.negatives),
            "auc": None if self.auc is None else float(self.auc),
            "positive_quantiles": _quantile_dict(self.positive_quantiles),
            "negative_quantiles": _quantile_dict(self.negative_quantiles),
        }

    @classmethod
    def from_dict(cls, payload: Any) -> LevelDiagnostics:
        keys = {"level", "negatives", "auc", "positive_quantiles", "negative_quantiles"}
        if not isinstance(payload, Mapping) or set(payload) != keys:
            raise ValueError(f"level diagnostics must be a mapping with keys {sorted(keys)}")
        return cls(
            level=payload["level"],
            negatives=payload["negatives"],
            auc=payload["auc"],
            positive_quantiles=_quantiles_from_dict(payload["positive_quantiles"]),
            negative_quantiles=_quantiles_from_dict(payload["negative_quantiles"]),
        )


@dataclass(frozen=True)
class CalibrationDiagnostics:
    """Everything :func:`diagnose` found: per-level summaries, the score band, the warnings and their limits.

    Attributes:
        levels: one :class:`LevelDiagnostics` per level, finest first.
        band: ``(low, high)``: the 5th percentile of all pairs' scores and the 95th of the finest level's
            positive pairs (see the module docstring).
        warnings: what makes the thresholds untrustworthy, causes first; empty when nothing does.
        limits: the limits the warnings were raised against.
    """

    levels: tuple[LevelDiagnostics, ...]
    band: tuple[float, float]
    warnings: tuple[CalibrationWarning, ...] = ()
    limits: DiagnosticLimits = field(default_factory=DiagnosticLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        band = tuple(self.band)
        if len(band) != 2 or not all(isinstance(v, int | float) and -1.0 <= v <= 1.0 for v in band):
            raise ValueError(f"score band must be two scores in [-1, 1], got {self.band!r}")
        object.__setattr__(self, "band", (float(band[0]), float(band[1])))
        if not self.levels:
            raise ValueError("calibration diagnostics need at least one level")

    @property
    def band_width(self) -> float:
        """Width of the score band (0 when the finest positives sit below the bulk of all pairs)."""
        return max(self.band[1] - self.band[0], 0.0)

    @property
    def kinds(self) -> set[str]:
        """The kinds of the warnings raised."""
        return {warning.kind for warning in self.warnings}

    def level(self, name: str) -> LevelDiagnostics:
        """The summary of level ``name``."""
        for entry in self.levels:
            if entry.level == name:
                return entry
        raise ValueError(f"no diagnostics for level {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the manifest's calibration under ``"diagnostics"``."""
        return {
            "band": list(self.band),
            "levels": [entry.to_dict() for entry in self.levels],
            "warnings": [warning.to_dict() for warning in self.warnings],
            "limits": self.limits.to_dict(),
        }

    @classmethod
    def from_dict(cls, payload: Any) -> CalibrationDiagnostics:
        """Rebuild diagnostics from :meth:`to_dict` output.

        Raises:
            ValueError: a payload that is not diagnostics (keys, types or ranges).
        """
        keys = {"band", "levels", "warnings", "limits"}
        if not isinstance(payload, Mapping) or set(payload) != keys:
            raise ValueError(f"calibration diagnostics must be a mapping with keys {sorted(keys)}")
        if not all(isinstance(payload[key], list) for key in ("band", "levels", "warnings")):
            raise ValueError("calibration diagnostics: band, levels and warnings must be lists")
        return cls(
            levels=tuple(LevelDiagnostics.from_dict(item) for item in payload["levels"]),
            band=tuple(payload["band"]),
            warnings=tuple(CalibrationWarning.from_dict(item) for item in payload["warnings"]),
            limits=DiagnosticLimits.from_dict(payload["limits"]),
        )


def histogram_quantiles(hist: np.ndarray, edges: np.ndarray, percentiles: Sequence[int] = QUANTILES) -> tuple | None:
    """Percentiles of the scores counted in ``hist``: the ``ceil(p n / 100)``-th smallest, as its bin's lower edge.

    Ranks are computed in integers, so no rounding of ``p n / 100`` can pick the neighbouring score.
    Returns ``None`` for an empty histogram.
    """
    hist = np.asarray(hist, dtype=np.int64)
    count = int(hist.sum())
    if count == 0:
        return None
    cumulative = np.cumsum(hist)
    ranks = np.array([max((p * count + 99) // 100, 1) for p in percentiles], dtype=np.int64)
    return tuple(float(edges[j]) for j in np.searchsorted(cumulative, ranks, side="left"))


def histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(positive score > negative score) + P(same bin) / 2 from two histograms on one grid; ``None`` if one is empty.

    Exactly the Mann-Whitney statistic of the binned scores (float64 sums: relative error about 1e-15).
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    num_pos, num_neg = float(pos.sum()), float(neg.sum())
    if num_pos == 0 or num_neg == 0:
        return None
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    return min(max(float(np.dot(pos, below + 0.5 * neg)) / (num_pos * num_neg), 0.0), 1.0)


def diagnose(
    counts: PairCounts, levels: Sequence[LevelThreshold], limits: DiagnosticLimits | None = None
) -> CalibrationDiagnostics:
    """Summaries and warnings for thresholds chosen on ``counts`` (see the module docstring for the rules).

    Args:
        counts: the pair histograms the thresholds were chosen on.
        levels: the chosen thresholds with their precision and F1, finest first, one per level of ``counts``.
        limits: the warning limits; default :class:`DiagnosticLimits`.

    Raises:
        ValueError: ``levels`` that do not name the levels of ``counts`` in order.
    """
    limits = limits or DiagnosticLimits()
    names = [entry.level for entry in levels]
    if names != list(counts.levels):
        raise ValueError(f"thresholds for levels {names} do not match the counted levels {list(counts.levels)}")
    edges = counts.edges
    summaries = []
    for k, name in enumerate(names):
        positives = counts.positives[k]
        negatives = counts.total - positives
        summaries.append(
            LevelDiagnostics(
                level=name,
                negatives=int(negatives.sum()),
                auc=histogram_auc(positives, negatives),
                positive_quantiles=histogram_quantiles(positives, edges),
                negative_quantiles=histogram_quantiles(negatives, edges),
            )
        )
    low = histogram_quantiles(counts.total, edges, (BAND_PERCENTILES[0],))
    high = histogram_quantiles(counts.positives[0], edges, (BAND_PERCENTILES[1],))
    band = (low[0] if low else -1.0, high[0] if high else 1.0)
    warnings = _warnings(summaries, band, levels, limits)
    return CalibrationDiagnostics(tuple(summaries), band, warnings, limits)


def _warnings(
    summaries: Sequence[LevelDiagnostics],
    band: tuple[float, float],
    levels: Sequence[LevelThreshold],
    limits: DiagnosticLimits,
) -> tuple[CalibrationWarning, ...]:
    """Every warning the limits call for, causes (squeezed, overlap) before consequences (crowded, low F1)."""
    (low, high), width = band, max(band[1] - band[0], 0.0)
    finest = levels[0].level
    found: list[CalibrationWarning] = []
    if width < limits.min_band:
        found.append(
            CalibrationWarning(
                "squeezed",
                (),
                f"pair scores are squeezed into {low:.3f} to {high:.3f} (5th percentile of all pairs to the 95th of "
                f"same-{finest} pairs), a band of {width:.3f} < {limits.min_band:g}: thresholds this close together "
                f"are moved by small score shifts (a student or float16/int8 query encoder); whiten the descriptors "
                f"({_WHITEN_HINT}) or train the encoder more (more epochs, more labelled images)",
            )
        )
    for summary in summaries:
        if summary.auc is not None and summary.auc < limits.min_auc:
            name = summary.level
            found.append(
                CalibrationWarning(
                    "overlap",
                    (name,),
                    f"{name}: same-{name} and other pairs overlap heavily (AUC {summary.auc:.3f} < "
                    f"{limits.min_auc:g}, 0.5 is chance), so no threshold separates them well; train the encoder "
                    "more on images like these, or try --whiten learned",
                )
            )
    crowded_limit = max(limits.crowded_fraction * width, limits.crowded_absolute)
    for finer, coarser in itertools.pairwise(levels):
        gap = finer.threshold - coarser.threshold
        if gap < crowded_limit:
            found.append(
                CalibrationWarning(
                    "crowded",
                    (finer.level, coarser.level),
                    f"the {finer.level} ({finer.threshold:.4f}) and {coarser.level} ({coarser.threshold:.4f}) "
                    f"thresholds are {gap:.4f} apart, under {crowded_limit:.4f} (the larger of "
                    f"{limits.crowded_fraction:.0%} of the score band and {limits.crowded_absolute:g}): the two "
                    "levels tag almost the same hits",
                )
            )
    for entry in levels:
        if entry.precision < limits.min_precision:
            found.append(
                CalibrationWarning(
                    "low_precision",
                    (entry.level,),
                    f"{entry.level}: precision {entry.precision:.3f} at threshold {entry.threshold:.4f} "
                    f"(< {limits.min_precision:g}): most hits tagged {entry.level} are not of the query's "
                    f"{entry.level} class",
                )
            )
    for entry in levels:
        if entry.f1 < limits.min_f1:
            found.append(
                CalibrationWarning(
                    "low_f1",
                    (entry.level,),
                    f"{entry.level}: F1 {entry.f1:.3f} at threshold {entry.threshold:.4f} (< {limits.min_f1:g}): "
                    f"the {entry.level} tag misses or mislabels most {entry.level} matches",
                )
            )
    return tuple(found)


def _quantile_dict(values: tuple[float, ...] | None) -> dict[str, float] | None:
    if values is None:
        return None
    return {f"p{p:02d}": float(v) for p, v in zip(QUANTILES, values, strict=True)}


def _quantiles_from_dict(payload: Any) -> tuple[float, ...] | None:
    if payload is None:
        return None
    keys = [f"p{p:02d}" for p in QUANTILES]
    if not isinstance(payload, Mapping) or sorted(payload) != sorted(keys):
        raise ValueError(f"score quantiles must be a mapping with keys {keys} or null")
    values = tuple(payload[key] for key in keys)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError("score quantiles must be finite numbers")
    return values
