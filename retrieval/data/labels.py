"""Hierarchical labels: one ordered list of levels, fine first, shared by datasets, losses and metrics.

Every component that handles labels agrees on one array layout: an integer array of
shape ``(N, L)`` whose column ``k`` holds the class index at level ``k`` of the schema,
with level 0 the finest. A single-level dataset is simply ``L = 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_LEVELS", "LabelSchema", "LabelVocabulary"]

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
