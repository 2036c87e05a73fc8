"""The search engine: a query encoder paired with the index it is allowed to query.

Vectors from two different encoders live in unrelated spaces; searching one with the other
returns confident-looking nonsense. The engine therefore checks the pairing once, when it is
built: the query encoder must be the encoder that built the index, or a student distilled
into that encoder's space (its ``teacher_id``), and must produce vectors of the index's size.
Vectors embedded elsewhere (an on-device model) are checked the same way, per request, by
``check_query_vectors``: they must name an accepted encoder id and be finite, L2-normalised
rows of the encoder's dimension.

Every query vector, from any runtime or from a client, stays in the encoder's space here: an index built
with a whitening whitens its queries itself (``IndexDirectory.search``), so ``dim`` is the encoder's
dimension (``query_dim``) and may differ from the whitened vectors the index stores (``index_dim``).

Every search takes an optional ``where``: label filters (``indexing.vector_index.LabelFilter``, e.g. only
items whose ``coarse`` label is ``shoes``), evaluated by the index directory on any backend; the hits are the
best among the matching items.

Errors raised for a request (``granularity_threshold``, ``check_where``, ``check_query_vectors``) name no
server path, so the HTTP API can return their messages as they are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexing import (
    IndexDirectory,
    Manifest,
    NotCalibratedError,
    SearchResults,
    UnknownGranularityError,
    open_index_dir,
)
from indexing.errors import UnknownLevelError
from indexing.index_dir import Where
from indexing.vector_index import LabelFilter
from retrieval.errors import UserFacingError
from retrieval.resources import Closeable
from serving.runtimes import QueryEncoder, QueryEncoderError, open_query_encoder

__all__ = [
    "NORM_TOLERANCE",
    "EncoderMismatchError",
    "ForeignEmbeddingError",
    "NonFiniteEmbeddingError",
    "QueryVectorError",
    "SearchEngine",
    "check_compatible",
    "resolve_query_encoder_path",
]

#: How far from 1 the L2 norm of an incoming query vector may be: float16 on-device outputs land within 1e-3,
#: a forgotten normalisation lands far outside.
NORM_TOLERANCE = 0.01

logger = logging.getLogger(__name__)


class EncoderMismatchError(UserFacingError, ValueError):
    """A query encoder whose embedding space is not the index's; the message names both ids."""


class ForeignEmbeddingError(UserFacingError, ValueError):
    """A query vector from an encoder whose space is not the index's (the HTTP API answers 409)."""


class NonFiniteEmbeddingError(UserFacingError, RuntimeError):
    """The query encoder produced NaN or infinite values: a server-side fault (a corrupt or broken model file).

    Raised instead of searching, so a broken model gives one clear error rather than a FAISS failure or
    meaningless hits; the API answers it with a 500 JSON message and ``/v1/readyz`` stays 503.
    """


class QueryVectorError(UserFacingError, ValueError):
    """A query vector of the wrong dimension, with non-finite values or not L2-normalised (HTTP 422)."""


class SearchEngine(Closeable):
    """Embeds query images and searches an index directory with them.

    Args:
        index_dir: an opened index directory (``indexing.open_index_dir``).
        query_encoder: a runtime from ``serving.runtimes``; its ``encoder_id`` or ``teacher_id`` must
            equal the index manifest's ``encoder_id``, and its ``dim`` the index's ``query_dim``.

    Raises:
        EncoderMismatchError: the query encoder does not embed into the index's space.
    """

    def __init__(self, index_dir: IndexDirectory, query_encoder: QueryEncoder) -> None:
        check_compatible(index_dir, query_encoder)
        self.index_dir = index_dir
        self.query_encoder = query_encoder
        fitted_for = self.thresholds_fitted_for
        if fitted_for is not None and fitted_for != query_encoder.encoder_id:
            logger.warning(
                "the granularity thresholds of %s were calibrated for the queries of encoder %s, but queries come "
                "from %s, whose scores against the gallery differ: hit levels are less reliable; recalibrate with "
                "`retrieval index calibrate %s --labels VAL.csv --query-encoder CHECKPOINT`",
                index_dir.path.name,
                fitted_for,
                query_encoder.encoder_id,
                index_dir.path.name,
            )

    @classmethod
    def open(
        cls,
        index_path: str | Path,
        query_encoder_path: str | Path | None = None,
        runtime: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        **runtime_options: Any,
    ) -> SearchEngine:
        """Open an index directory and its query encoder.

        Args:
            index_path: the index directory.
            query_encoder_path: a checkpoint directory or ``.onnx`` file; defaults to the checkpoint
                that built the index (``manifest.encoder_path``).
            runtime: force a runtime by name (see ``serving.runtimes.RUNTIMES``).
            backend_options: override the options the manifest records for its vector backend (e.g.
                ``{"url": ...}`` to reach a Qdrant collection through another address than at build time).
            runtime_options: passed to the runtime (``device``, ``providers``, ``batch_size``).

        Raises:
            indexing.IndexFormatError: ``index_path`` is not a valid index directory.
            QueryEncoderError: no query encoder given and the manifest names none, or it cannot be opened.
            EncoderMismatchError: see the class.
        """
        index_dir = open_index_dir(index_path, backend_options)
        try:
            path = resolve_query_encoder_path(index_dir.path, index_dir.manifest, query_encoder_path)
            encoder = open_query_encoder(path, runtime=runtime, **runtime_options)
            return cls(index_dir, encoder)
        except BaseException:
            index_dir.close()
            raise

    @property
    def count(self) -> int:
        """Number of items in the index."""
        return len(self.index_dir)

    @property
    def encoder_id(self) -> str:
        """Id of the encoder whose space the index holds."""
        return self.index_dir.manifest.encoder_id

    @property
    def dim(self) -> int:
        """Dimension of query vectors: the encoder's (what ``search_embeddings`` and clients' vectors have)."""
        return self.index_dir.query_dim

    @property
    def index_dim(self) -> int:
        """Dimension of the vectors the index stores: ``dim``, or the whitened dimension of a whitened index."""
        return self.index_dir.dim

    @property
    def thresholds(self) -> dict[str, float]:
        """The index's calibrated ``{level: threshold}``, finest first; empty when it is not calibrated."""
        return dict(self.index_dir.manifest.thresholds)

    @property
    def accepted_encoder_ids(self) -> list[str]:
        """Ids of the encoders whose vectors may query this index: the index's own and the served query encoder's.

        The served query encoder is accepted because it was checked when the engine was built (it is the
        index encoder or a student distilled into its space), so its on-device twin, which carries the same
        id, can send its vectors to ``search_embeddings``.
        """
        ids = [self.encoder_id]
        if self.query_encoder.encoder_id not in ids:
            ids.append(self.query_encoder.encoder_id)
        return ids

    def granularity_threshold(self, granularity: str) -> float:
        """The calibrated threshold of ``granularity``, checked before any work is done for a request.

        Raises:
            indexing.NotCalibratedError: the index has no thresholds.
            indexing.UnknownGranularityError: not a calibrated level; the message lists them.
        """
        thresholds = self.index_dir.manifest.thresholds
        if not thresholds:
            raise NotCalibratedError(
                "this index has no granularity thresholds; calibrate it with `retrieval index calibrate INDEX "
                "--labels CSV` on labelled validation images, or search without a granularity"
            )
        if granularity not in thresholds:
            raise UnknownGranularityError(
                f"unknown granularity {granularity!r}; this index is calibrated for {', '.join(thresholds)}"
            )
        return thresholds[granularity]

    def check_where(self, where: Where) -> tuple[LabelFilter, ...]:
        """``where`` as a tuple of filters, each on a label level of this index; checked before any work is done.

        Raises:
            indexing.errors.UnknownLevelError: a filter on a level the index does not have; the message lists
                the index's levels and names no server path.
        """
        filters = (where,) if isinstance(where, LabelFilter) else tuple(where or ())
        levels = self.index_dir.manifest.levels
        for one in filters:
            if not isinstance(one, LabelFilter):
                raise TypeError(f"where takes LabelFilter objects, got {type(one).__name__}")
            if one.level not in levels:
                have = ", ".join(levels) or "none (the index stores no labels)"
                raise UnknownLevelError(f"cannot filter on label level {one.level!r}; this index has {have}")
        return filters

    def check_query_vectors(self, vectors: object, encoder_id: str, teacher_id: str | None = None) -> np.ndarray:
        """Validate query vectors embedded elsewhere (an on-device model) and return them as ``(Q, dim)`` float32.

        A phone may run a student distilled into this index's space that the server does not serve itself
        (the server embeds uploads with the teacher, say); such a model declares its ``teacher_id``, as
        its exported metadata says, and is accepted when that is the index's encoder. The ids guard
        against mistakes (a model for another index), not against a client that lies about them.

        Args:
            vectors: one vector or a sequence of vectors.
            encoder_id: id of the encoder that produced them; accepted when in ``accepted_encoder_ids``.
            teacher_id: for a distilled student, the id of the encoder it was distilled into; accepted when it
                is the index's encoder id.

        Raises:
            ForeignEmbeddingError: ``encoder_id`` is not accepted (the vectors live in another space).
            QueryVectorError: wrong dimension, a non-finite value, or a row whose L2 norm is not 1
                (within ``NORM_TOLERANCE``).
        """
        accepted = self.accepted_encoder_ids
        if encoder_id not in accepted and teacher_id != self.encoder_id:
            teacher = f" (distilled into {teacher_id!r})" if teacher_id else ""
            raise ForeignEmbeddingError(
                f"the embedding comes from encoder {encoder_id!r}{teacher}, whose space this index does not share; "
                f"accepted: encoder ids {', '.join(accepted)}, or a student whose teacher_id is {self.encoder_id}"
            )
        try:
            array = np.asarray(vectors, dtype=np.float64)
        except (TypeError, ValueError):
            raise QueryVectorError("the embedding must be a list of numbers") from None
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            got = array.shape[-1] if array.ndim else 0
            raise QueryVectorError(
                f"the embedding has {got} dimensions; this index takes {self.dim}-d query vectors (the encoder's)"
            )
        if not np.isfinite(array).all():
            raise QueryVectorError("the embedding contains non-finite values (NaN or infinity)")
        norms = np.linalg.norm(array, axis=1)
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            raise QueryVectorError(
                f"the embedding must be L2-normalised (norm 1 within {NORM_TOLERANCE:g}); its norm is "
                f"{float(norms[bad][0]):.6g}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed query images with the query encoder: ``(N, dim)`` float32, L2-normalised rows."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.checked_embeddings(self.query_encoder.encode(images))

    def checked_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` from the query encoder, refused when a value is NaN or infinite (a broken model file).

        Raises:
            NonFiniteEmbeddingError: see the class.
        """
        if not np.isfinite(vectors).all():
            bad = int((~np.isfinite(vectors).all(axis=1)).sum())
            raise NonFiniteEmbeddingError(
                f"the query encoder {self.query_encoder.encoder_id} produced non-finite values (NaN or infinity) for "
                f"{bad} of {len(vectors)} images; its model file is probably corrupt: export or copy it again"
            )
        return vectors

    def search(
        self, images: Sequence[Image.Image], k: int, granularity: str | None = None, where: Where = None
    ) -> list[SearchResults]:
        """The ``k`` nearest gallery items of each query image, best first.

        Hits of a calibrated index carry ``level``, the finest level whose threshold they reach. With
        ``granularity``, only hits reaching that level's threshold are returned, up to ``k`` (see
        ``IndexDirectory.search``).

        Args:
            images: query images (any mode; converted to RGB by the preprocessing).
            k: hits per query (fewer when the index holds fewer items, or fewer pass ``granularity``).
            granularity: a calibrated level name, or ``None`` for a plain k-NN search.
            where: label filters (all must match); the hits are the best ``k`` among the matching items.

        Raises:
            ValueError: a non-positive ``k``.
            indexing.NotCalibratedError: a granularity asked of an index without thresholds.
            indexing.UnknownGranularityError: a granularity that is not a calibrated level.
            indexing.errors.UnknownLevelError: a filter on a level the index does not have.
        """
        _check_k(k)
        if granularity is not None:
            self.granularity_threshold(granularity)  # before the encoder runs
        filters = self.check_where(where)
        if not images:
            return []
        return self.search_embeddings(self.embed(images), k, granularity, filters)

    def search_embeddings(
        self, vectors: np.ndarray, k: int, granularity: str | None = None, where: Where = None
    ) -> list[SearchResults]:
        """Like ``search`` for query vectors already embedded (``(Q, dim)`` float32, L2-normalised).

        The vectors are in the encoder's space, as any query encoder gives them; a whitened index whitens
        them itself. Vectors from outside the server should pass ``check_query_vectors`` first.

        Raises:
            ValueError: a non-positive ``k`` or vectors of the wrong shape.
            indexing.NotCalibratedError, indexing.UnknownGranularityError: see ``granularity_threshold``.
            indexing.errors.UnknownLevelError: see ``check_where``.
        """
        _check_k(k)
        if granularity is not None:
            self.granularity_threshold(granularity)
        filters = self.check_where(where)
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return []
        return self.index_dir.search(vectors, k, granularity=granularity, where=list(filters) or None)

    def search_above(
        self, images: Sequence[Image.Image], min_score: float, limit: int | None = None, where: Where = None
    ) -> tuple[list[SearchResults], bool]:
        """Every gallery item scoring above ``min_score`` for each query image (range search), best first.

        Returns the results and whether the index lacked a native range search (then a k-NN search with a
        growing k, filtered at ``min_score``, was used; see ``IndexDirectory.search_above``). ``where`` keeps
        only the matching items, as for ``search``.

        Raises:
            ValueError: ``min_score`` outside [-1, 1] or a non-positive ``limit``.
            indexing.errors.UnknownLevelError: a filter on a level the index does not have.
        """
        _check_min_score(min_score)
        filters = self.check_where(where)
        if not images:
            return [], False
        return self.search_embeddings_above(self.embed(images), min_score, limit, filters)

    def search_embeddings_above(
        self, vectors: np.ndarray, min_score: float, limit: int | None = None, where: Where = None
    ) -> tuple[list[SearchResults], bool]:
        """Like ``search_above`` for query vectors already embedded (encoder space, as for ``search_embeddings``)."""
        _check_min_score(min_score)
        filters = self.check_where(where)
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return [], False
        return self.index_dir.search_above(vectors, min_score, limit, where=list(filters) or None)

    def warm_up(self) -> None:
        """Run one blank query through the encoder and the index, so the first real query pays no set-up cost."""
        size = int(self.query_encoder.preprocess.input_size)
        vectors = self.embed([Image.new("RGB", (size, size), (127, 127, 127))])
        self.search_embeddings(vectors, 1)

    @property
    def thresholds_fitted_for(self) -> str | None:
        """The encoder whose queries the thresholds were calibrated for; ``None`` when not calibrated."""
        manifest = self.index_dir.manifest
        if not manifest.thresholds:
            return None
        calibration = manifest.calibrated()
        query_encoder_id = calibration.query_encoder_id if calibration is not None else None
        return query_encoder_id or manifest.encoder_id

    def describe(self) -> dict[str, Any]:
        """What is served, without any server path: sizes, encoder ids, backend, filterable levels, thresholds.

        ``backend`` is the vector backend's name only: its options (a Qdrant URL, a collection) stay private.
        """
        manifest = self.index_dir.manifest
        whitening = manifest.whitening
        return {
            "count": self.count,
            "dim": self.dim,
            "index_dim": self.index_dim,
            "whitening": whitening.model_dump(include={"method", "dim_in", "dim_out", "fitted_on", "count"})
            if whitening is not None
            else None,
            "encoder_id": self.encoder_id,
            "query_encoder_id": self.query_encoder.encoder_id,
            "query_encoder_teacher_id": self.query_encoder.teacher_id,
            "accepted_encoder_ids": self.accepted_encoder_ids,
            "levels": list(manifest.levels),
            "granularities": list(manifest.thresholds),
            "thresholds": dict(manifest.thresholds),
            "thresholds_fitted_for": self.thresholds_fitted_for,
            "index_type": manifest.factory,
            "backend": manifest.backend,
        }

    def close(self) -> None:
        self.index_dir.close()

    def __repr__(self) -> str:
        index = str(self.index_dir.path)
        return f"SearchEngine(index={index!r}, count={self.count}, query_encoder={self.query_encoder!r})"


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_min_score(min_score: float) -> None:
    if not -1.0 <= float(min_score) <= 1.0 or math.isnan(float(min_score)):
        raise ValueError(f"min_score is a cosine similarity in [-1, 1], got {min_score}")


def check_compatible(index_dir: IndexDirectory, query_encoder: QueryEncoder) -> None:
    """Refuse a query encoder that does not embed into the space of ``index_dir``.

    Raises:
        EncoderMismatchError: neither the encoder id nor the teacher id is the index's encoder id, or
            the encoder's dimension is not the index's ``query_dim`` (its encoder's, before any whitening).
    """
    manifest = index_dir.manifest
    accepted = {query_encoder.encoder_id, query_encoder.teacher_id} - {None}
    if manifest.encoder_id not in accepted:
        teacher = f" (teacher {query_encoder.teacher_id})" if query_encoder.teacher_id else " (no teacher)"
        raise EncoderMismatchError(
            f"query encoder {query_encoder.encoder_id}{teacher} cannot search index {index_dir.path}, which was "
            f"built by encoder {manifest.encoder_id}: use that encoder, a student distilled from it, or rebuild "
            "the index with this encoder"
        )
    if query_encoder.dim != manifest.query_dim:
        raise EncoderMismatchError(
            f"query encoder {query_encoder.encoder_id} produces {query_encoder.dim}-d embeddings but index "
            f"{index_dir.path} expects {manifest.query_dim}-d vectors from its encoder"
        )


def resolve_query_encoder_path(
    index_path: str | Path, manifest: Manifest, query_encoder_path: str | Path | None = None
) -> Path:
    """The query encoder to use for an index: the one given, else the checkpoint that built the index.

    A relative ``manifest.encoder_path`` is taken relative to the index directory.

    Raises:
        QueryEncoderError: nothing given and the manifest names no encoder, or the chosen path does not exist.
    """
    if query_encoder_path is not None:
        path = Path(query_encoder_path)
        if not path.exists():
            raise QueryEncoderError(f"query encoder not found: {path}")
        return path
    recorded = manifest.encoder_path
    if not recorded:
        raise QueryEncoderError(
            f"index {index_path} does not record the encoder that built it; pass a query encoder explicitly"
        )
    path = Path(recorded)
    if not path.is_absolute():
        path = Path(index_path) / path
    if not path.exists():
        raise QueryEncoderError(
            f"the encoder that built index {index_path} is no longer at {path}; pass a query encoder explicitly"
        )
    return path
