"""Descriptor whitening: a linear map fitted once, stored with the index, applied to gallery and queries alike.

Why: an encoder used away from its training data (a synthetic-trained model on real photos, say) tends to put
every descriptor in a narrow cone: cosine similarities crowd into 0.83-1.0, calibrated thresholds land at
0.99x and an unrelated photo can score 0.998. A few directions of large, shared variance dominate every inner
product. Centring the descriptors and rescaling their principal directions (PCA whitening), or rescaling the
directions in which *matching* images differ (learned whitening), spreads the scores and usually improves the
ranking; it is the standard post-processing of retrieval descriptors. Search stays an inner product of
L2-normalised vectors, so the index does not change kind: ``y = normalise(P (x - m))``.

Two methods are registered (``WHITENING_METHODS``); a third is one function and one ``WhiteningMethod``:

* ``pca`` (unsupervised): ``m`` = mean of the fitting vectors, ``C`` = their covariance,
  ``C = V diag(l) V^T`` with ``l`` descending, ``P = diag((l + eps)^(-1/2)) V^T`` restricted to its first
  ``dim`` rows.
* ``learned`` (Radenović, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI
  2018): from matching pairs ``(i, j)`` (same finest-level class), ``C_S`` = mean of
  ``(x_i - x_j)(x_i - x_j)^T``, regularised; ``W = C_S^(-1/2)`` (symmetric inverse square root, from the
  eigen-decomposition); ``C_D`` = covariance of ``W (x - m)`` over **all** fitting vectors (as in the
  authors' reference code, not over the non-matching pairs); ``C_D = U diag(d) U^T`` descending;
  ``P = U^T W``, first ``dim`` rows. Matching-pair differences then have identity covariance, and the
  kept directions are those where the (whitened) data varies most.

Rank and shrinkage. ``n`` vectors span at most ``rank = min(n - 1, D)`` directions after centring; the other
eigenvalues are rounding noise, and whitening them would blow noise up to unit variance. So at most the
non-degenerate directions are kept (eigenvalue above ``DEGENERATE_TOLERANCE`` times the largest; never more
than ``rank``), and ``dim`` beyond that is an error. Within the kept directions a small fitting set
under-estimates the trailing eigenvalues, which whitening would then amplify most; both methods therefore
shrink towards a scaled identity: ``eps = shrinkage * trace(C) / D`` (the mean variance per input dimension)
is added to the eigenvalues (``pca``) or to ``C_S`` (``learned``, where it also makes a rank-deficient
``C_S`` invertible). ``DEFAULT_SHRINKAGE`` = 0.1 caps the amplification of any direction relative to an
average one at about ``sqrt(10)``; ``shrinkage=0`` gives the textbook maps (tests check both).

Numerics: fitting runs in float64, streaming over the vectors in blocks (no float64 copy of the gallery);
the stored mean and projection are float32. The module needs numpy and safetensors only, so the torch-free
ONNX serving path applies the same code to its queries as the build applied to the gallery.

File: ``whitening.safetensors`` holds ``mean`` ``(D,)`` and ``projection`` ``(dim, D)`` float32, with the
method, what it was fitted on and how, in the safetensors header metadata. Safetensors holds arrays only, so
reading one runs no code; its SHA-256 is recorded in the index manifest and checked before it is parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import IndexFormatError
from retrieval.atomic import write_file_atomically
from retrieval.errors import UserFacingError
from retrieval.registry import Registry

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "DEFAULT_MAX_VECTORS",
    "DEFAULT_SHRINKAGE",
    "WHITENING_FILE",
    "WHITENING_METHODS",
    "Whitening",
    "WhiteningError",
    "WhiteningMethod",
    "fit_learned_whitening",
    "fit_pca_whitening",
    "fit_whitening",
    "load_whitening",
    "matching_pairs",
]

logger = logging.getLogger(__name__)

#: Name of the whitening file inside an index directory.
WHITENING_FILE = "whitening.safetensors"
#: ``eps = DEFAULT_SHRINKAGE * trace(C) / D`` is added to the eigenvalues (see the module docstring).
DEFAULT_SHRINKAGE = 0.1
#: Eigenvalues at or below this fraction of the largest count as degenerate (directions the data does not span).
DEGENERATE_TOLERANCE = 1e-9
#: Matching pairs used by ``learned`` at most; beyond it a seeded uniform sample of the pairs is drawn.
DEFAULT_MAX_PAIRS = 200_000
#: Fitting vectors used at most; beyond it a seeded uniform sample is drawn (a covariance converges long before).
DEFAULT_MAX_VECTORS = 1_000_000
#: Rows per block when streaming over vectors or pairs: bounds the float64 working memory to a few hundred MB.
_BLOCK = 16_384
_FORMAT = "retrieval-whitening"
_FORMAT_VERSION = "1"


class WhiteningError(UserFacingError, ValueError):
    """Vectors or labels a whitening cannot be fitted on, or a ``dim`` they cannot support; the message says why."""


@dataclass(frozen=True, eq=False)
class Whitening:
    """A fitted whitening: ``apply(x) = normalise((x - mean) @ projection.T)``.

    Attributes:
        method: the registered method that fitted it (``"pca"``, ``"learned"``).
        mean: ``(dim_in,)`` float32 centre.
        projection: ``(dim_out, dim_in)`` float32, rows in decreasing order of importance.
        fitted_on: what it was fitted on, for people (``"gallery data/test.csv"``).
        count: vectors it was fitted on.
        details: how (shrinkage, matching pairs, kept eigenvalues...), JSON-serialisable.
    """

    method: str
    mean: np.ndarray
    projection: np.ndarray
    fitted_on: str = ""
    count: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0] or not projection.size:
            raise ValueError(f"whitening mean {mean.shape} and projection {projection.shape} do not fit together")
        if projection.shape[0] > projection.shape[1]:
            raise ValueError(f"a whitening cannot add dimensions: projection {projection.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
            raise ValueError("whitening mean and projection must be finite")
        mean.setflags(write=False)
        projection.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "projection", projection)

    @property
    def dim_in(self) -> int:
        """Dimension of the encoder's vectors (what queries arrive with)."""
        return int(self.mean.shape[0])

    @property
    def dim_out(self) -> int:
        """Dimension of the whitened vectors (what the index stores)."""
        return int(self.projection.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whiten ``(N, dim_in)`` vectors: centre, project, L2-normalise; ``(N, dim_out)`` float32.

        The same code whitens the gallery at build time and every query at search time, so both sides
        meet in the same space whatever runtime embedded them.

        Raises:
            ValueError: wrong shape, a non-finite value, or a vector exactly at the mean (it has no
                direction once centred).
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"vectors to whiten must have shape (N, {self.dim_in}), got {x.shape}")
        out = np.empty((x.shape[0], self.dim_out), dtype=np.float32)
        for start in range(0, x.shape[0], _BLOCK):
            block = np.asarray(x[start : start + _BLOCK], dtype=np.float32)
            if not np.isfinite(block).all():
                raise ValueError("vectors to whiten contain NaN or infinite values")
            y = (block - self.mean) @ self.projection.T
            norms = np.linalg.norm(y, axis=1, keepdims=True)
            if (norms <= 0).any():
                row = start + int(np.argmin(norms[:, 0]))
                raise ValueError(f"vector {row} lies at the whitening mean and has no direction once centred")
            out[start : start + len(block)] = y / norms
        return out

    def describe(self) -> dict[str, Any]:
        """Method, dimensions and what it was fitted on, for manifests, summaries and ``/v1/index``."""
        return {
            "method": self.method,
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "fitted_on": self.fitted_on,
            "count": self.count,
        }

    def to_bytes(self) -> bytes:
        """The safetensors file content: the two arrays, and method, provenance and details as header metadata.

        Serialised here rather than by ``safetensors.numpy.save``, whose header order varies from run to run:
        the same whitening always gives the same bytes (and checksum), which any safetensors reader opens.
        """
        metadata = {
            "count": str(self.count),
            "details": json.dumps(self.details, sort_keys=True),
            "fitted_on": self.fitted_on,
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "method": self.method,
        }
        header: dict[str, Any] = {"__metadata__": metadata}
        blobs, offset = [], 0
        for name, array in (("mean", self.mean), ("projection", self.projection)):
            blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
        return struct.pack("<Q", len(text)) + text + b"".join(blobs)

    def save(self, path: str | Path) -> str:
        """Write ``path`` atomically and return its SHA-256 (to record in the manifest)."""
        data = self.to_bytes()
        write_file_atomically(path, data)
        return hashlib.sha256(data).hexdigest()


def load_whitening(path: str | Path, expected_sha256: str | None = None) -> Whitening:
    """Read a whitening file, refusing one whose bytes are not those recorded (``expected_sha256``).

    The checksum is computed on the bytes that are then parsed, so a file swapped in between cannot slip
    through. Parsing reads arrays only (safetensors); nothing in the file can run code.

    Raises:
        IndexFormatError: missing file, checksum mismatch, or content that is not a valid whitening
            (wrong arrays, shapes, dtypes, non-finite values); the message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read the whitening file ({exc.strerror or exc})") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise IndexFormatError(
                f"{path} is corrupt or was modified after the index was written (SHA-256 {actual[:12]}..., "
                f"the manifest expects {expected_sha256[:12]}...); rebuild the index"
            )
    try:
        return _parse(data)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, struct.error) as exc:
        raise IndexFormatError(f"{path} is not a valid whitening file: {exc}") from None
    except Exception as exc:  # safetensors' own error type for a malformed header or buffer
        raise IndexFormatError(f"{path} is not a valid whitening file: {exc}") from None


def _parse(data: bytes) -> Whitening:
    from safetensors.numpy import load

    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise ValueError("the header is longer than the file")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"its header does not say format {_FORMAT!r}")
    if metadata.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported whitening format version {metadata.get('format_version')!r}")
    arrays = load(data)
    if set(arrays) != {"mean", "projection"}:
        raise ValueError(f"expected the arrays 'mean' and 'projection', found {sorted(arrays)}")
    for name, array in arrays.items():
        if array.dtype != np.float32:
            raise ValueError(f"{name} is {array.dtype}, expected float32")
    details = json.loads(metadata.get("details") or "{}")
    if not isinstance(details, dict):
        raise ValueError("its details are not a JSON object")
    return Whitening(
        method=str(metadata.get("method", "")),
        mean=arrays["mean"],
        projection=arrays["projection"],
        fitted_on=str(metadata.get("fitted_on", "")),
        count=int(metadata.get("count", "0")),
        details=details,
    )


# ----------------------------------------------------------------------------------------------- fitting


def fit_pca_whitening(
    x: np.ndarray,
    dim: int | None = None,
    *,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_vectors: int = DEFAULT_MAX_VECTORS,
    seed: int = 0,
    fitted_on: str = "",
) -> Whitening:
    """PCA whitening of ``(n, D)`` vectors (see the module docstring for the formula, rank and shrinkage).

    Args:
        x: the fitting vectors (encoder space, usually L2-normalised), any float dtype.
        dim: directions to keep; default all non-degenerate ones (at most ``min(n - 1, D)``).
        shrinkage: ``eps = shrinkage * trace(C) / D`` added to every eigenvalue; 0 for exact whitening.
        max_vectors: fit on a seeded sample of this many vectors when there are more.
        seed: seeds that sample.
        fitted_on: a description recorded with the result.

    Raises:
        WhiteningError: fewer than 2 vectors, non-finite values, data with no variance, a bad ``dim`` or
            a negative ``shrinkage``.
    """
    total = len(np.asarray(x))
    x, rows = _fitting_vectors(x, max_vectors, seed)
    _check_shrinkage(shrinkage)
    mean, cov = _mean_and_covariance(x)
    values, vectors = _eigen_descending(cov)
    keep = _kept_directions(values, len(x), x.shape[1], dim)
    eps = shrinkage * float(np.trace(cov)) / x.shape[1]
    projection = (vectors[:, :keep] / np.sqrt(values[:keep] + eps)).T
    details = {"shrinkage": shrinkage, "eps": eps, "rank": _rank(values, len(x)), **_spectrum(values[:keep])}
    if rows is not None:
        details["sampled_from"] = total
    logger.info("fitted PCA whitening on %d vectors: %d -> %d dims", len(x), x.shape[1], keep)
    return Whitening("pca", mean, projection, fitted_on, len(x), details)


def fit_learned_whitening(
    x: np.ndarray,
    labels: np.ndarray,
    dim: int | None = None,
    *,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    max_vectors: int = DEFAULT_MAX_VECTORS,
    seed: int = 0,
    fitted_on: str = "",
) -> Whitening:
    """Radenović et al.'s learned whitening from the matching pairs that ``labels`` define.

    Args:
        x: ``(n, D)`` fitting vectors.
        labels: ``(n,)`` class per vector at the finest level (or ``(n, L)``, column 0 finest); ints or
            strings; ``None``, ``""`` or a negative int marks an unlabelled vector (used for ``m`` and ``C_D``,
            in no pair).
        dim: directions to keep; default all non-degenerate ones (at most ``min(n - 1, D)``).
        shrinkage: ``eps = shrinkage * trace(C_S) / D`` added to ``C_S`` before its inverse square root.
        max_pairs: use a seeded uniform sample of this many matching pairs when there are more.
        max_vectors: fit on a seeded sample of this many vectors when there are more.
        seed: seeds both samples.
        fitted_on: a description recorded with the result.

    Raises:
        WhiteningError: fewer than 2 vectors, non-finite values, labels of another length, no two vectors
            of the same class, matching pairs that never differ (with ``shrinkage=0``), or a bad ``dim``.
    """
    codes = _class_codes(labels, len(np.asarray(x)))
    total = len(codes)
    x, rows = _fitting_vectors(x, max_vectors, seed)
    if rows is not None:
        codes = codes[rows]
    _check_shrinkage(shrinkage)
    first, second = matching_pairs(codes, max_pairs, seed)
    n, d = x.shape
    pair_cov = np.zeros((d, d))
    for start in range(0, len(first), _BLOCK):
        diff = x[first[start : start + _BLOCK]].astype(np.float64) - x[second[start : start + _BLOCK]]
        pair_cov += diff.T @ diff
    pair_cov /= len(first)
    eps = shrinkage * float(np.trace(pair_cov)) / d
    s_values, s_vectors = _eigen_descending(pair_cov + eps * np.eye(d))
    if s_values[-1] <= DEGENERATE_TOLERANCE * max(s_values[0], np.finfo(np.float64).tiny):
        raise WhiteningError(
            f"the {len(first)} matching pairs do not differ in every direction, so their covariance cannot be "
            "inverted; use a positive shrinkage or more labelled images"
        )
    inv_sqrt = (s_vectors / np.sqrt(s_values)) @ s_vectors.T  # C_S^(-1/2), symmetric
    mean, data_cov = _mean_and_covariance(x, transform=inv_sqrt)
    values, vectors = _eigen_descending(data_cov)
    keep = _kept_directions(values, n, d, dim)
    projection = vectors[:, :keep].T @ inv_sqrt
    details = {
        "shrinkage": shrinkage,
        "eps": eps,
        "pairs": len(first),
        "classes": int(np.unique(codes[codes >= 0]).size),
        "rank": _rank(values, n),
        **_spectrum(values[:keep]),
    }
    if rows is not None:
        details["sampled_from"] = total
    logger.info("fitted learned whitening on %d vectors, %d pairs: %d -> %d dims", n, len(first), d, keep)
    return Whitening("learned", mean, projection, fitted_on, n, details)


def matching_pairs(
    codes: np.ndarray, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j`` in class order, of items of the same class (``codes >= 0``), or a sample.

    Pairs are numbered class by class (classes in increasing code, members in increasing position, pairs
    lexicographically); when there are more than ``max_pairs``, a seeded uniform sample of the numbers is
    decoded, so a gallery with millions of images never materialises its (billions of) pairs.

    Returns:
        Two ``(P,)`` int64 arrays of positions into ``codes``, sorted by pair number.

    Raises:
        WhiteningError: no class has two members.
    """
    if max_pairs < 1:
        raise WhiteningError(f"max_pairs must be positive, got {max_pairs}")
    codes = np.asarray(codes, dtype=np.int64)
    labelled = np.flatnonzero(codes >= 0)
    order = labelled[np.argsort(codes[labelled], kind="stable")]
    _, starts, sizes = np.unique(codes[order], return_index=True, return_counts=True)
    counts = sizes * (sizes - 1) // 2
    total = int(counts.sum())
    if total == 0:
        raise WhiteningError(
            f"learned whitening needs matching pairs (two images of the same finest-level class), but none of "
            f"the {labelled.size} labelled vectors shares its class with another"
        )
    if total <= max_pairs:
        numbers = np.arange(total, dtype=np.int64)
    else:
        numbers = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False)).astype(np.int64)
    ends = np.cumsum(counts)
    cls = np.searchsorted(ends, numbers, side="right")
    within = numbers - (ends - counts)[cls]
    a, b = _triangle(within, sizes[cls])
    return order[starts[cls] + a], order[starts[cls] + b]


def _triangle(t: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair number ``t`` among the ``c (c - 1) / 2`` pairs ``a < b`` of ``c`` items, in lexicographic order."""

    def before(a: np.ndarray) -> np.ndarray:  # pairs whose first item is below a
        return a * c - a * (a + 1) // 2

    a = np.floor(((2 * c - 1) - np.sqrt(np.maximum((2 * c - 1) ** 2 - 8 * t, 0).astype(np.float64))) / 2)
    a = np.clip(a.astype(np.int64), 0, np.maximum(c - 2, 0))
    for _ in range(2):  # float rounding can put a one off either way
        a = np.where(before(a + 1) <= t, a + 1, a)
        a = np.where(before(a) > t, a - 1, a)
    return a, t - before(a) + a + 1


def _class_codes(labels: Any, n: int) -> np.ndarray:
    """Labels (ints or strings, ``(n,)`` or ``(n, L)`` with the finest first) as int codes, -1 = unlabelled."""
    array = np.asarray(labels, dtype=object if not isinstance(labels, np.ndarray) else None)
    if array.ndim == 2:
        array = array[:, 0]
    if array.ndim != 1 or len(array) != n:
        raise WhiteningError(f"learned whitening needs one label per vector: got labels of shape {array.shape} for {n}")
    if array.dtype.kind in "iu":
        return np.where(array >= 0, array, -1).astype(np.int64)
    present = np.array([v is not None and v == v and str(v) != "" for v in array.tolist()], dtype=bool)
    codes = np.full(n, -1, dtype=np.int64)
    if present.any():
        _, inverse = np.unique(np.array([str(v) for v in array[present].tolist()]), return_inverse=True)
        codes[present] = inverse
    return codes


def _fitting_vectors(x: np.ndarray, max_vectors: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Check the fitting vectors; with more than ``max_vectors``, a seeded sample and its sorted row numbers."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1 or x.dtype.kind not in "fiu":
        raise WhiteningError(f"whitening is fitted on an (n, D) array of numbers, got shape {x.shape} ({x.dtype})")
    if len(x) < 2:
        raise WhiteningError(f"whitening needs at least 2 vectors to fit on, got {len(x)}")
    for start in range(0, len(x), _BLOCK):
        if not np.isfinite(x[start : start + _BLOCK]).all():
            raise WhiteningError("the vectors to fit a whitening on contain NaN or infinite values")
    if max_vectors < 2:
        raise WhiteningError(f"max_vectors must be at least 2, got {max_vectors}")
    if len(x) <= max_vectors:
        return x, None
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=max_vectors, replace=False))
    logger.info("fitting the whitening on a sample of %d of %d vectors", max_vectors, len(x))
    return x[rows], rows


def _check_shrinkage(shrinkage: float) -> None:
    if not (np.isfinite(shrinkage) and shrinkage >= 0):
        raise WhiteningError(f"shrinkage must be a finite number >= 0, got {shrinkage}")


def _mean_and_covariance(x: np.ndarray, transform: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``x`` and covariance of ``transform (x - mean)`` (or of ``x - mean``), in float64, by blocks."""
    n, d = x.shape
    total = np.zeros(d)
    for start in range(0, n, _BLOCK):
        total += x[start : start + _BLOCK].astype(np.float64).sum(axis=0)
    mean = total / n
    out = d if transform is None else transform.shape[0]
    cov = np.zeros((out, out))
    for start in range(0, n, _BLOCK):
        centred = x[start : start + _BLOCK].astype(np.float64) - mean
        if transform is not None:
            centred = centred @ transform.T
        cov += centred.T @ centred
    return mean, cov / (n - 1)


def _eigen_descending(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    # A deterministic sign per eigenvector (largest entry positive): the same data always gives the same file.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return np.maximum(values, 0.0), vectors * np.where(signs == 0, 1.0, signs)


def _rank(values: np.ndarray, n: int) -> int:
    """Directions the fitting data spans: eigenvalues above the tolerance, never more than ``n - 1``."""
    if values[0] <= 0:
        return 0
    return int(min((values > DEGENERATE_TOLERANCE * values[0]).sum(), n - 1, len(values)))


def _kept_directions(values: np.ndarray, n: int, d: int, dim: int | None) -> int:
    rank = _rank(values, n)
    if rank == 0:
        raise WhiteningError(f"the {n} vectors to fit a whitening on are all identical: there is no variance")
    if dim is None:
        return rank
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise WhiteningError(f"the whitening dimension must be a positive integer, got {dim!r}")
    if dim > rank:
        raise WhiteningError(
            f"whitening dimension {dim} is larger than the {rank} directions that {n} vectors of dimension {d} "
            f"span (at most min(n - 1, D) = {min(n - 1, d)}); ask for at most {rank} or fit on more images"
        )
    return int(dim)


def _spectrum(values: np.ndarray) -> dict[str, float]:
    """The kept eigenvalues' range: how uneven the variance was before whitening (for ``index info``)."""
    return {"largest_eigenvalue": float(values[0]), "smallest_kept_eigenvalue": float(values[-1])}


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WhiteningMethod:
    """A registered way to fit a whitening.

    Attributes:
        fit: ``fit(x, labels, dim) -> Whitening``; ``labels`` is ``None`` for unsupervised methods.
        needs_labels: the method needs a class per fitting vector (matching pairs).
        summary: one line for ``--help``: what it does and when to use it.
    """

    fit: Callable[[np.ndarray, np.ndarray | None, int | None], Whitening]
    needs_labels: bool
    summary: str


WHITENING_METHODS: Registry[WhiteningMethod] = Registry("whitening method")
WHITENING_METHODS.add(
    "pca",
    WhiteningMethod(
        fit=lambda x, labels, dim: fit_pca_whitening(x, dim),
        needs_labels=False,
        summary="centre + PCA whitening, unsupervised: any gallery, no labels needed",
    ),
)
WHITENING_METHODS.add(
    "learned",
    WhiteningMethod(
        fit=lambda x, labels, dim: fit_learned_whitening(x, labels, dim),
        needs_labels=True,
        summary="Radenovic et al.'s learned whitening from matching pairs: needs fine-level labels",
    ),
)


def fit_whitening(
    method: str, x: np.ndarray, labels: np.ndarray | None = None, dim: int | None = None, *, fitted_on: str = ""
) -> Whitening:
    """Fit the registered ``method`` with its defaults.

    Raises:
        retrieval.registry.UnknownNameError: an unknown method (the message lists the valid ones).
        WhiteningError: the method needs labels and got none, or its fit failed (see the fit functions).
    """
    entry = WHITENING_METHODS.get(method)
    if entry.needs_labels and labels is None:
        raise WhiteningError(f"whitening method {method!r} needs a label per fitting vector (matching pairs)")
    fitted = entry.fit(x, labels, dim)
    return replace(fitted, method=method, fitted_on=fitted_on or fitted.fitted_on)
