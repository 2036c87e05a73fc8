"""Search at a granularity: keep the hits above a level's calibrated threshold and tag each hit with its level.

The thresholds come from :mod:`indexing.calibration` (a :class:`~indexing.calibration.Calibration`) or
straight from an index manifest's ``thresholds`` mapping (``{level: threshold}``, finest first). Both
follow the ruler order, fine >= middle >= coarse, so a hit that passes a level also passes every coarser
one and "the finest level it passes" is well defined. A hit passes a level when ``score >= threshold``,
the comparison the calibration counted with.

These functions only filter what a search returned. Since the passing hits are a prefix of a ranking, the
passing hits among a k-NN search's best ``k`` are exactly the best ``k`` passing hits (what
``IndexDirectory.search(..., granularity=...)`` returns); a caller that wants *all* hits above a threshold,
however many, should use a range search (or a k-NN search with a k large enough that its last hit falls
below the threshold).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import replace

from indexing.calibration import Calibration
from indexing.results import SearchResults

__all__ = ["filter_by_granularity", "finest_level", "level_thresholds", "tag_hits"]

Thresholds = Calibration | Mapping[str, float]


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


def tag_hits(results: SearchResults, calibration: Thresholds) -> SearchResults:
    """The same ranking with every hit's ``level`` set to the finest level its score passes (``None`` below all)."""
    thresholds = level_thresholds(calibration)
    return SearchResults(
        tuple(
            replace(hit, level=next((level for level, threshold in thresholds if hit.score >= threshold), None))
            for hit in results
        )
    )
