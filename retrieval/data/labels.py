"""Hierarchical labels: one ordered list of levels, fine first, shared by datasets, losses and metrics.

Every component that handles labels agrees on one array layout: an integer array of
shape ``(N, L)`` whose column ``k`` holds the class index at level ``k`` of the schema,
with level 0 the finest. A single-level dataset is simply ``L = 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_LEVELS", "LabelSchema", "LabelVocabulary", "class_parents"]

DEFAULT_LEVELS: tuple[str, ...] = ("fine", "middle", "coarse")


@dataclass(frozen=True)
class LabelSchema:
    """Ordered label levels, finest first (e.g. ``("fine", "middle", "coarse")``)."""

    levels: tuple[str, ...] = DEFAULT_LEVELS

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a label schema needs at least one level")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"label levels must be unique, got {self.levels}")

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def index(self, level: str) -> int:
        """Column of ``level`` in a ``(N, L)`` label array."""
        try:
            return self.levels.index(level)
        except ValueError:
            raise ValueError(f"unknown label level {level!r}; levels are {', '.join(self.levels)}") from None

    def select(self, levels: Iterable[str] | None) -> list[int]:
        """Column indices of the named levels (all levels when ``None``)."""
        return list(range(self.num_levels)) if levels is None else [self.index(name) for name in levels]

    def check_hierarchy(self, labels: np.ndarray) -> None:
        """Raise if a finer class maps to more than one coarser class (the levels must nest)."""
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[1] != self.num_levels:
            raise ValueError(f"labels must have shape (N, {self.num_levels}), got {labels.shape}")
        for k in range(self.num_levels - 1):
            pairs = np.unique(labels[:, k : k + 2], axis=0)
            finer, counts = np.unique(pairs[:, 0], return_counts=True)
            if (counts > 1).any():
                bad = int(finer[counts > 1][0])
                raise ValueError(
                    f"labels do not nest: a {self.levels[k]} class ({bad}) has several {self.levels[k + 1]} parents"
                )


@dataclass
class LabelVocabulary:
    """Maps class names to contiguous integer ids, one table per level, in first-seen order."""

    schema: LabelSchema
    names: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [[] for _ in self.schema.levels]
        self._ids = [{name: i for i, name in enumerate(level)} for level in self.names]

    def encode(self, row: Sequence[str]) -> list[int]:
        """Class names (one per level) to ids, adding unseen names."""
        if len(row) != self.schema.num_levels:
            raise ValueError(f"expected {self.schema.num_levels} label values, got {len(row)}")
        ids = []
        for k, name in enumerate(row):
            table = self._ids[k]
            if name not in table:
                table[name] = len(self.names[k])
                self.names[k].append(name)
            ids.append(table[name])
        return ids

    def decode(self, ids: Sequence[int]) -> dict[str, str]:
        """Ids (one per level) to a ``{level: name}`` dict."""
        return {level: self.names[k][int(i)] for k, (level, i) in enumerate(zip(self.schema.levels, ids, strict=True))}

    def num_classes(self, level: str | int) -> int:
        k = self.schema.index(level) if isinstance(level, str) else level
        return len(self.names[k])


def class_parents(labels: np.ndarray, num_fine_classes: int | None = None) -> np.ndarray:
    """The class tree as an ``(C_fine, L)`` int64 table: row ``f`` holds fine class ``f``'s id at every level.

    Losses that share fine-class proxies across levels (Cross-Scale Learning) need to know, for every
    proxy, which middle and coarse class it belongs to, including classes absent from the current batch;
    this table is that knowledge, read once from the training labels. Column 0 is ``arange(C_fine)``.

    Args:
        labels: ``(N, L)`` integer labels, finest first; the levels must nest.
        num_fine_classes: number of fine classes (default ``labels[:, 0].max() + 1``); every fine class
            below it must occur in ``labels``.

    Raises:
        ValueError: labels that are not ``(N, L)`` integers, that do not nest, or a fine class that never occurs.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty (N, L) integer array, got shape {labels.shape}, {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    count = int(labels[:, 0].max()) + 1 if num_fine_classes is None else int(num_fine_classes)
    parents = np.full((count, labels.shape[1]), -1, dtype=np.int64)
    parents[labels[:, 0]] = labels  # any row of a fine class gives its parents; check they all agree
    if (parents[labels[:, 0]] != labels).any():
        raise ValueError("labels do not nest: a fine class has several parents at a coarser level")
    missing = np.flatnonzero(parents[:, 0] < 0)
    if missing.size:
        raise ValueError(f"fine class {int(missing[0])} has no labelled example; its parents are unknown")
    return parents
