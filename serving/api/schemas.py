"""Request and response bodies of the HTTP API, as pydantic models.

They are the contract shared by the API, the search page and on-device clients, and FastAPI turns
them into the OpenAPI schema, so every field says what it holds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from indexing import SearchHit

__all__ = [
    "EmbeddingSearchRequest",
    "ErrorBody",
    "Health",
    "Hit",
    "IndexDescription",
    "LabelWhere",
    "Readiness",
    "SearchResponse",
    "WhiteningDescription",
    "thumbnail_url",
]

#: Largest embedding a request may carry; real encoders stay far below it, and it bounds the JSON to parse.
MAX_EMBEDDING_DIM = 16384
#: Bounds of a request's label filters (``where``): levels filtered on, accepted values per level, and the
#: length of a level name and of a value. Real hierarchies have a handful of levels; the bounds keep the
#: metadata scan a filter costs, and the request to parse, small.
MAX_FILTER_LEVELS = 16
MAX_FILTER_VALUES = 256
MAX_LEVEL_LENGTH = 64
MAX_VALUE_LENGTH = 256

_Level = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LEVEL_LENGTH)]
_Value = Annotated[str, StringConstraints(min_length=1, max_length=MAX_VALUE_LENGTH)]
#: Label filters as the API reads and echoes them: ``{level: [accepted values]}``; an item matches when, at
#: every level given, its label is one of that level's values.
LabelWhere = dict[_Level, Annotated[list[_Value], Field(min_length=1, max_length=MAX_FILTER_VALUES)]]


def thumbnail_url(item_id: int) -> str:
    """Where the page (and any client) fetches the thumbnail of an indexed item."""
    return f"/v1/items/{item_id}/thumbnail"


class ErrorBody(BaseModel):
    """Every error answer: one message written for the caller (422 validation errors carry a list)."""

    detail: str | list[dict[str, Any]] = Field(description="what was wrong with the request")


class Hit(BaseModel):
    """One gallery item matching the query."""

    id: int = Field(description="the item's id in the index (its position in the gallery at build time)")
    score: float = Field(description="cosine similarity of the query and the item, in [-1, 1]; higher is closer")
    path: str | None = Field(description="the item's image path or name as recorded at indexing, if any")
    labels: dict[str, str] = Field(description="the item's class name per label level, e.g. {'fine': 'red-shirt'}")
    level: str | None = Field(
        description="the finest calibrated level whose threshold the score reaches (null: index not calibrated, "
        "or below every threshold)"
    )
    extra: dict[str, Any] | None = Field(description="the item's other metadata (SKU, URL, ...), or null")
    thumbnail_url: str = Field(description="URL of a JPEG thumbnail of the item on this server")

    @classmethod
    def from_hit(cls, hit: SearchHit) -> Hit:
        return cls(
            id=hit.id,
            score=hit.score,
            path=hit.path,
            labels=dict(hit.labels),
            level=hit.level,
            extra=dict(hit.extra) if hit.extra else None,
            thumbnail_url=thumbnail_url(hit.id),
        )


class SearchResponse(BaseModel):
    """The ranked hits of one query, best first."""

    k: int = Field(description="the most hits asked for")
    took_ms: float = Field(description="server time for the request, from its arrival to the answer, in ms")
    query_encoder_id: str = Field(description="id of the encoder that embedded the query")
    granularity: str | None = Field(description="the level asked for (only hits above its threshold), or null")
    min_score: float | None = Field(description="the score every hit exceeds (range search), or null")
    range_search: Literal["native", "knn_fallback"] | None = Field(
        description="with min_score: FAISS's own range search, or a k-NN search filtered at min_score"
    )
    where: LabelWhere | None = Field(
        default=None,
        description="the label filters applied, as {level: [values]} (every hit's label at each level is one of "
        "its values), or null for an unfiltered search",
    )
    hits: list[Hit] = Field(description="the matching items, best first")


class EmbeddingSearchRequest(BaseModel):
    """A query embedded on the client (the on-device model), searched without sending the image."""

    model_config = ConfigDict(extra="forbid")

    embedding: list[float] = Field(
        min_length=1,
        max_length=MAX_EMBEDDING_DIM,
        description="the query vector as the encoder outputs it: the encoder's dimension (GET /v1/index 'dim'; a "
        "whitened index whitens it on the server), finite, L2-normalised (norm 1 within 0.01)",
    )
    encoder_id: str = Field(
        min_length=1,
        max_length=256,
        description="id of the model that produced the vector; one of the index's accepted_encoder_ids, or a "
        "student's id together with its teacher_id",
    )
    teacher_id: str | None = Field(
        default=None,
        max_length=256,
        description="for a distilled student (its model metadata's teacher_id): accepted when it is the index's "
        "encoder id",
    )
    k: int | None = Field(default=None, ge=1, description="most hits to return (default: the server's default_k)")
    granularity: str | None = Field(
        default=None, max_length=64, description="a calibrated level: only hits above its threshold"
    )
    min_score: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="return every item scoring above this (range search)"
    )
    where: LabelWhere | None = Field(
        default=None,
        max_length=MAX_FILTER_LEVELS,
        description='only items whose labels match, as {level: [accepted values]}, e.g. {"coarse": ["shoes"]}: '
        "at every level given, the item's label must be one of the listed values (levels from GET /v1/index "
        "'levels'; an unknown level is a 422). The hits are the best k among the matching items",
        examples=[{"coarse": ["shoes"]}, {"coarse": ["shoes"], "middle": ["sneakers", "boots"]}],
    )


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = Field(description="always 'ok'")


class Readiness(BaseModel):
    """Readiness: the index and the query encoder are open and one warm-up query ran."""

    status: Literal["ready"] = Field(description="'ready' (a 503 with a detail otherwise)")
    count: int = Field(description="items in the index")
    query_encoder_id: str = Field(description="id of the served query encoder")


class WhiteningDescription(BaseModel):
    """The whitening a whitened index applies to its gallery vectors and to every query, on the server."""

    method: str = Field(description="'pca' (centring + PCA whitening) or 'learned' (from matching pairs)")
    dim_in: int = Field(description="dimension of the encoder's vectors, which queries are sent in")
    dim_out: int = Field(description="dimension of the whitened vectors the index stores")
    fitted_on: str = Field(description="what it was fitted on (the gallery, or a separate image set)")
    count: int = Field(description="vectors it was fitted on")


class IndexDescription(BaseModel):
    """What this server searches."""

    count: int = Field(description="items in the index")
    dim: int = Field(description="dimension of query embeddings: the encoder's (what POST /v1/search/embedding takes)")
    index_dim: int = Field(description="dimension of the stored vectors: dim, or the whitened dimension")
    whitening: WhiteningDescription | None = Field(
        description="the whitening applied to gallery and queries, or null when the index stores raw embeddings"
    )
    encoder_id: str = Field(description="id of the encoder that embedded the gallery")
    query_encoder_id: str = Field(description="id of the encoder that embeds uploaded query images")
    query_encoder_teacher_id: str | None = Field(
        description="the teacher the query encoder was distilled into, or null when it is the index encoder"
    )
    accepted_encoder_ids: list[str] = Field(description="encoder ids whose vectors POST /v1/search/embedding accepts")
    levels: list[str] = Field(
        description="label levels of the gallery metadata, finest first: the levels a search's 'where' may filter on"
    )
    granularities: list[str] = Field(description="calibrated levels a search may ask for, finest first")
    thresholds: dict[str, float] = Field(description="calibrated similarity threshold per level")
    thresholds_fitted_for: str | None = Field(
        None,
        description="id of the encoder whose queries the thresholds were calibrated for (the index encoder, or a "
        "student calibrated with --query-encoder); null when the index is not calibrated. When it is not "
        "query_encoder_id, the levels of uploaded-image hits are less reliable",
    )
    index_type: str = Field(
        description="the index type: for FAISS its factory string, e.g. 'Flat' (exact) or 'IVF1024,PQ32'"
    )
    backend: str = Field(
        description="where the vectors live: 'faiss' (in the server process) or 'qdrant' (a Qdrant collection)",
    )
