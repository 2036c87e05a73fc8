"""Search results as immutable, validated values.

Every consumer (CLI, HTTP API, granularity filtering) relies on the same two invariants:
hits are sorted best first and no item appears twice. Checking them once, where results
are built, means a faulty index type or a bad merge of shards fails loudly instead of
returning a subtly mis-ordered list.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCORE_TOLERANCE", "SearchHit", "SearchResults"]

#: Allowed increase between consecutive scores; FAISS float32 sums may differ in the last bits.
SCORE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SearchHit:
    """One gallery item returned for a query.

    Attributes:
        id: the engine's own item id (the gallery position at build time).
        score: inner product of the L2-normalised query and item embeddings (cosine similarity).
        path: the item's image path or display name, when the metadata has one.
        labels: the item's class name per label level, e.g. ``{"fine": "red-shirt", "coarse": "top"}``.
        level: the finest label level whose calibrated threshold the score reaches (see
            :mod:`indexing.granularity`); ``None`` when the index is not calibrated or the score is below
            every threshold.
        extra: the item's other metadata (the gallery CSV's extra columns: SKU, URL, ...), often what a
            product page needs to show the hit.
    """

    id: int
    score: float
    path: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    level: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, the shape the HTTP API returns; ``"level"`` and ``"extra"`` only when set."""
        payload: dict[str, Any] = {"id": self.id, "score": self.score, "path": self.path, "labels": dict(self.labels)}
        if self.level is not None:
            payload["level"] = self.level
        if self.extra:
            payload["extra"] = dict(self.extra)
        return payload


@dataclass(frozen=True)
class SearchResults:
    """The ranked hits for one query: scores non-increasing, ids unique.

    Raises:
        ValueError: on construction, if a score is not finite, scores increase by more than
            ``SCORE_TOLERANCE`` from one hit to the next, or an id appears twice.
    """

    hits: tuple[SearchHit, ...] = ()

    def __post_init__(self) -> None:
        hits = tuple(self.hits)
        object.__setattr__(self, "hits", hits)
        for position, hit in enumerate(hits):
            if not isinstance(hit, SearchHit):
                raise ValueError(f"hit {position} is a {type(hit).__name__}, not a SearchHit")
            if not math.isfinite(hit.score):
                raise ValueError(f"hit {position} (id {hit.id}) has a non-finite score {hit.score}")
        for position in range(1, len(hits)):
            previous, current = hits[position - 1].score, hits[position].score
            if current > previous + SCORE_TOLERANCE:
                raise ValueError(f"search results are not sorted: hit {position} scores {current} after {previous}")
        ids = [hit.id for hit in hits]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"search results contain duplicate ids: {duplicates[:10]}")

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[SearchHit]:
        return iter(self.hits)

    def __getitem__(self, position: int) -> SearchHit:
        return self.hits[position]

    @property
    def ids(self) -> list[int]:
        return [hit.id for hit in self.hits]

    @property
    def scores(self) -> list[float]:
        return [hit.score for hit in self.hits]

    def without_ids(self, ids: Collection[int]) -> SearchResults:
        """The same ranking with the given ids removed (e.g. the query itself when it is in the gallery)."""
        return SearchResults(tuple(hit for hit in self.hits if hit.id not in ids))

    def top(self, k: int) -> SearchResults:
        """The first ``k`` hits."""
        return SearchResults(self.hits[:k])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"hits": [{"id", "score", "path", "labels"[, "level"][, "extra"]}, ...]}``."""
        return {"hits": [hit.to_dict() for hit in self.hits]}
