"""Damage done to files on purpose, as a bad disk or an interrupted copy would, for the corrupt-artifact tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["flip_bytes", "truncate"]


def flip_bytes(path: Path, count: int, seed: int) -> None:
    """Invert ``count`` distinct bytes of ``path`` at seeded positions (what a bad disk or copy does)."""
    data = bytearray(path.read_bytes())
    for position in np.random.default_rng(seed).choice(len(data), count, replace=False):
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Keep the first half of ``path`` (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
