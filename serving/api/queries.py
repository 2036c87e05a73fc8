"""Answering queries against a ``SearchEngine``: what the micro-batcher runs in its worker thread.

Each request decodes its own upload in the thread pool first (``ImageQuery.decoded``, behind the app's
decode gate), so uploads decode on every core while a batch is embedded, and the number of decoded
images in memory stays bounded; the batch then shares one ``encode`` call. A query that reaches
``answer_image_queries`` undecoded is decoded there; one that fails fails alone, and the rest of its
batch is answered.

Only the encoding is shared: each query of a batch is then searched on its own, with its own ``k``,
granularity, threshold and label filters (``where``), so queries with different filters can share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from indexing import IndexFormatError, SearchResults
from indexing.vector_index import LabelFilter
from retrieval.data.images import decode_image_bytes
from serving.engine import SearchEngine

__all__ = ["Answer", "ImageQuery", "answer_image_queries", "answer_vectors"]


@dataclass(frozen=True)
class ImageQuery:
    """One uploaded image and what to search for.

    Attributes:
        data: the file's bytes.
        name: the client's file name, for error messages.
        k: most hits.
        granularity: a calibrated level (already checked), or ``None``.
        min_score: range-search threshold, or ``None`` for a k-NN search.
        image: the upload already decoded (see the module docstring), else ``None``: decoded with its batch.
        max_pixels: refuse an upload declaring more pixels (``ImageTooLargeError``); ``None``: no limit of ours.
        target_size: the model's input side, so a very large JPEG may decode at a reduced scale.
        where: label filters (already checked), all of which a hit must match; empty for none.
    """

    data: bytes
    name: str
    k: int
    granularity: str | None = None
    min_score: float | None = None
    image: Image.Image | None = None
    max_pixels: int | None = None
    target_size: int | None = None
    where: tuple[LabelFilter, ...] = ()

    def decoded(self) -> ImageQuery:
        """This query with its upload decoded (raises ``CorruptImageError`` for an unreadable one)."""
        if self.image is not None:
            return self
        image = decode_image_bytes(self.data, self.name, max_pixels=self.max_pixels, target_size=self.target_size)
        return replace(self, data=b"", image=image)


@dataclass(frozen=True)
class Answer:
    """The hits of one query and, for a range search, whether the k-NN fallback ran (else ``None``)."""

    results: SearchResults
    range_fallback: bool | None = None


def answer_vectors(
    engine: SearchEngine,
    vectors: np.ndarray,
    k: int,
    granularity: str | None = None,
    min_score: float | None = None,
    where: tuple[LabelFilter, ...] = (),
) -> Answer:
    """Search one query vector (``(1, dim)``): k-NN (optionally at a granularity) or, with ``min_score``, a range.

    ``where`` keeps only the items matching every filter (the best ``k`` among them).
    """
    if min_score is None:
        (results,) = engine.search_embeddings(vectors, k, granularity, where=where)
        return Answer(results)
    (results,), fallback = engine.search_embeddings_above(vectors, min_score, k, where=where)
    return Answer(results, fallback)


def answer_image_queries(engine: SearchEngine, queries: list[ImageQuery]) -> list[Answer | BaseException]:
    """Decode every upload, embed the decodable ones in one call, and search each; one outcome per query.

    A ``CorruptImageError`` (or any per-query ``ValueError``) is returned in the query's place; a failure of
    the encoder itself propagates and fails the whole batch.
    """
    outcomes: list[Answer | BaseException | None] = [None] * len(queries)
    decoded = []
    for position, query in enumerate(queries):
        try:
            decoded.append((position, query.decoded().image))
        except ValueError as exc:  # CorruptImageError is a ValueError
            outcomes[position] = exc
    if decoded:
        vectors = engine.embed([image for _, image in decoded])
        for (position, _), vector in zip(decoded, vectors, strict=True):
            query = queries[position]
            try:
                outcomes[position] = answer_vectors(
                    engine, vector[None, :], query.k, query.granularity, query.min_score, query.where
                )
            except IndexFormatError:  # a damaged index fails the whole batch: the server's fault, not the query's
                raise
            except ValueError as exc:
                outcomes[position] = exc
    return [outcome if outcome is not None else RuntimeError("query left unanswered") for outcome in outcomes]
