"""Overlapping Gaussian clusters on the unit sphere: test data on which approximate indexes really approximate."""

from __future__ import annotations

import numpy as np


def clustered_unit_vectors(
    rng: np.random.Generator, n: int, d: int, centers: np.ndarray, spread: float = 1.0
) -> np.ndarray:
    """``n`` unit vectors: a random one of ``centers`` plus isotropic noise of norm ~``spread``, renormalised.

    Overlapping clusters (spread 1 around unit centers) make IVF with one probe miss ~40% of the
    neighbours, so the tests see approximate behaviour, unlike well-separated blobs.
    """
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
