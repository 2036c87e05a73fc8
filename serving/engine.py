"""The search engine: a query encoder paired with the index it is allowed to query.

Vectors from two different encoders live in unrelated spaces; searching one with the other
returns confident-looking nonsense. The engine therefore checks the pairing once, when it is
built: the query encoder must be the encoder that built the index, or a student distilled
into that encoder's space (its ``teacher_id``), and must produce vectors of the index's size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from indexing import IndexDirectory, Manifest, SearchResults, open_index_dir
from retrieval.errors import UserFacingError
from retrieval.resources import Closeable
from serving.runtimes import QueryEncoder, QueryEncoderError, open_query_encoder

__all__ = ["EncoderMismatchError", "SearchEngine", "check_compatible", "resolve_query_encoder_path"]

logger = logging.getLogger(__name__)


class EncoderMismatchError(UserFacingError, ValueError):
    """A query encoder whose embedding space is not the index's; the message names both ids."""


class SearchEngine(Closeable):
    """Embeds query images and searches an index directory with them.

    Args:
        index_dir: an opened index directory (``indexing.open_index_dir``).
        query_encoder: a runtime from ``serving.runtimes``; its ``encoder_id`` or ``teacher_id`` must
            equal the index manifest's ``encoder_id``, and its ``dim`` the index's.

    Raises:
        EncoderMismatchError: the query encoder does not embed into the index's space.
    """

    def __init__(self, index_dir: IndexDirectory, query_encoder: QueryEncoder) -> None:
        check_compatible(index_dir, query_encoder)
        self.index_dir = index_dir
        self.query_encoder = query_encoder

    @classmethod
    def open(
        cls,
        index_path: str | Path,
        query_encoder_path: str | Path | None = None,
        runtime: str | None = None,
        **runtime_options: Any,
    ) -> SearchEngine:
        """Open an index directory and its query encoder.

        Args:
            index_path: the index directory.
            query_encoder_path: a checkpoint directory or ``.onnx`` file; defaults to the checkpoint
                that built the index (``manifest.encoder_path``).
            runtime: force a runtime by name (see ``serving.runtimes.RUNTIMES``).
            runtime_options: passed to the runtime (``device``, ``providers``, ``batch_size``).

        Raises:
            indexing.IndexFormatError: ``index_path`` is not a valid index directory.
            QueryEncoderError: no query encoder given and the manifest names none, or it cannot be opened.
            EncoderMismatchError: see the class.
        """
        index_dir = open_index_dir(index_path)
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
        return self.index_dir.dim

    @property
    def thresholds(self) -> dict[str, float]:
        """The index's calibrated ``{level: threshold}``, finest first; empty when it is not calibrated."""
        return dict(self.index_dir.manifest.thresholds)

    def search(self, images: Sequence[Image.Image], k: int, granularity: str | None = None) -> list[SearchResults]:
        """The ``k`` nearest gallery items of each query image, best first.

        Hits of a calibrated index carry ``level``, the finest level whose threshold they reach. With
        ``granularity``, only hits reaching that level's threshold are returned, up to ``k`` (see
        ``IndexDirectory.search``).

        Args:
            images: query images (any mode; converted to RGB by the preprocessing).
            k: hits per query (fewer when the index holds fewer items, or fewer pass ``granularity``).
            granularity: a calibrated level name, or ``None`` for a plain k-NN search.

        Raises:
            ValueError: a non-positive ``k``.
            indexing.NotCalibratedError: a granularity asked of an index without thresholds.
            indexing.UnknownGranularityError: a granularity that is not a calibrated level.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if granularity is not None:
            self.index_dir.threshold(granularity)  # before the encoder runs
        if not images:
            return []
        embeddings = self.query_encoder.encode(images)
        return self.index_dir.search(embeddings, k, granularity=granularity)

    def search_above(
        self, images: Sequence[Image.Image], min_score: float, limit: int | None = None
    ) -> tuple[list[SearchResults], bool]:
        """Every gallery item scoring above ``min_score`` for each query image (range search), best first.

        Returns the results and whether the index lacked a native range search (then a k-NN search with a
        growing k, filtered at ``min_score``, was used; see ``IndexDirectory.search_above``).

        Raises:
            ValueError: ``min_score`` outside [-1, 1] or a non-positive ``limit``.
        """
        if not -1.0 <= float(min_score) <= 1.0:
            raise ValueError(f"min_score is a cosine similarity in [-1, 1], got {min_score}")
        if not images:
            return [], False
        return self.index_dir.search_above(self.query_encoder.encode(images), min_score, limit)

    def close(self) -> None:
        self.index_dir.close()

    def __repr__(self) -> str:
        index = str(self.index_dir.path)
        return f"SearchEngine(index={index!r}, count={self.count}, query_encoder={self.query_encoder!r})"


def check_compatible(index_dir: IndexDirectory, query_encoder: QueryEncoder) -> None:
    """Refuse a query encoder that does not embed into the space of ``index_dir``.

    Raises:
        EncoderMismatchError: neither the encoder id nor the teacher id is the index's encoder id, or
            the dimensions differ.
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
    if query_encoder.dim != manifest.dim:
        raise EncoderMismatchError(
            f"query encoder {query_encoder.encoder_id} produces {query_encoder.dim}-d embeddings but index "
            f"{index_dir.path} holds {manifest.dim}-d vectors"
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
