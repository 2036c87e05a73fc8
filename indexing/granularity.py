"""Search at a granularity: keep the hits above a level's calibrated threshold and tag each hit with its level.

The thresholds come from :mod:`indexing.calibration` (a :class:`~indexing.calibration.Calibration`) or
straight from an index manifest's ``thresholds`` mapping (``{level: threshold}``, finest first). Both
follow the ruler order, fine >= middle >= coarse, so a hit that passes a level also passes every coarser
one and "the finest level it passes" is well defined. A hit passes a level when ``score >= threshold``,
the comparison the calibration counted with.

These functions only filter what a search returned: a k-NN search may have cut off hits that would also
pass, so a caller that wants *all* hits above a threshold should use a range search (or a k-NN search with
a k large enough that its last hit falls below the threshold).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from indexing.calibration import Calibration
from indexing.results import SearchHit, SearchResults

__all__ = ["TaggedHit", "filter_by_granularity", "finest_level", "level_thresholds", "tag_hits"]

Thresholds = Calibration | Mapping[str, float]


@dataclass(frozen=True)
class TaggedHit:
    """A search hit with the finest label level whose threshold its score passes.

    Attributes:
        hit: the hit as the index returned it.
        level: the finest passing level, or ``None`` when the score is below every threshold.
    """

    hit: SearchHit
    level: str | None

    def to_dict(self) -> dict[str, Any]:
        """The hit's JSON form with a ``"level"`` key added."""
        return {**self.hit.to_dict(), "level": self.level}


def level_thresholds(calibration: Thresholds) -> list[tuple[str, float]]:
    """``[(level, threshold), ...]`` finest first, checked: non-empty, finite, in ruler order.

    Raises:
        ValueError: an empty mapping, a non-finite threshold, or thresholds that rise from a finer level to a
            coarser one (a mapping must list the levels finest first).
    """
    if isinstance(calibration, Calibration):
        return [(entry.level, float(entry.threshold)) for entry in calibration.levels]
    if not isinstance(calibration, Mapping) or not calibration:
        raise ValueError("thresholds must be a Calibration or a non-empty {level: threshold} mapping, finest first")
    pairs = [(str(level), float(value)) for level, value in calibration.items()]
    for level, value in pairs:
        if not math.isfinite(value):
            raise ValueError(f"threshold of level {level!r} is not finite: {value}")
    for (finer, finer_value), (coarser, coarser_value) in itertools.pairwise(pairs):
        if coarser_value > finer_value:
            raise ValueError(
                f"thresholds break the ruler order: {coarser} ({coarser_value:.6g}) is above {finer} "
                f"({finer_value:.6g}); list the levels finest first"
            )
    return pairs


def _threshold_of(level: str, thresholds: list[tuple[str, float]]) -> float:
    for name, value in thresholds:
        if name == level:
            return value
    raise ValueError(f"unknown granularity {level!r}; calibrated levels are {', '.join(n for n, _ in thresholds)}")


def finest_level(score: float, calibration: Thresholds) -> str | None:
    """The finest level whose threshold ``score`` reaches (``score >= threshold``), or ``None``.

    Raises:
        ValueError: a non-finite score or invalid thresholds.
    """
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    for level, threshold in level_thresholds(calibration):
        if score >= threshold:
            return level
    return None


def filter_by_granularity(
    results: SearchResults, calibration: Thresholds, level: str, k: int | None = None
) -> SearchResults:
    """The hits whose score reaches ``level``'s threshold, best first, at most ``k`` of them.

    Args:
        results: the ranked hits of one query.
        calibration: the thresholds (a Calibration or a ``{level: threshold}`` mapping, finest first).
        level: the granularity asked for, e.g. ``"middle"``.
        k: keep at most this many hits (default: all that pass).

    Raises:
        ValueError: an unknown level (the message lists the calibrated ones) or a ``k`` that is not positive.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    threshold = _threshold_of(level, level_thresholds(calibration))
    kept = tuple(hit for hit in results if hit.score >= threshold)
    return SearchResults(kept if k is None else kept[:k])


def tag_hits(results: SearchResults, calibration: Thresholds) -> tuple[TaggedHit, ...]:
    """Every hit paired with the finest level its score passes (``None`` below every threshold)."""
    thresholds = level_thresholds(calibration)
    return tuple(
        TaggedHit(hit, next((level for level, threshold in thresholds if hit.score >= threshold), None))
        for hit in results
    )
