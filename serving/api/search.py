"""``POST /v1/search`` (an uploaded image) and ``POST /v1/search/embedding`` (a vector embedded on the client).

Each parameter is read from one place: the image search takes multipart form fields only, the embedding
search a JSON body only. Both answer with the same ``SearchResponse``. Image queries go through the
app's micro-batcher, so concurrent uploads share one encoder call; the embedding search skips the
encoder and runs its (cheap) index search in the thread pool.

Both take label filters (``where``, see ``serving.api.filters``): the image search as repeated form fields
``where=LEVEL=V1[,V2]``, the embedding search as a JSON object ``{"LEVEL": ["V1", ...]}``; the answer echoes
them. Each query is searched with its own filters, also when its upload was embedded in a shared batch.

Engine errors become 4xx answers with messages that name no server path: a granularity the index is not
calibrated for (400) or does not know (422), a filter of bad syntax or on a level the index lacks (422,
naming its levels), an undecodable upload or a form with two images (400), an image
over the pixel limit (413, read from its header before decoding), a vector from another encoder's space (409)
or one of the wrong shape, with non-finite values or not L2-normalised (422). Image queries pass the app's
admission gates (``serving.admission``): beyond the queue, 503 with ``Retry-After``.
"""

# No ``from __future__ import annotations``: the endpoint annotations refer to ``settings`` in the enclosing
# function (``le=settings.max_k``), which FastAPI could not resolve from a string annotation.
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from indexing import IndexFormatError, NotCalibratedError, UnknownGranularityError
from indexing.vector_index import LabelFilter
from retrieval.data.images import ImageTooLargeError
from serving.api.batching import MicroBatcher
from serving.api.deps import Gates, get_batcher, get_engine, get_gates
from serving.api.filters import FORM_WHERE_HELP, checked_where, echo_where, filters_from_form, filters_from_json
from serving.api.metrics import REQUEST_START_KEY
from serving.api.queries import Answer, ImageQuery, answer_vectors
from serving.api.schemas import EmbeddingSearchRequest, ErrorBody, Hit, SearchResponse
from serving.engine import ForeignEmbeddingError, QueryVectorError, SearchEngine
from serving.limits import too_large_message
from serving.settings import ServeSettings

__all__ = ["build_response", "search_router"]

_ERRORS = {
    400: {"model": ErrorBody, "description": "not an image, or a granularity asked of an uncalibrated index"},
    401: {"model": ErrorBody, "description": "missing or invalid API key (when the server has one)"},
    413: {"model": ErrorBody, "description": "upload larger than the server's limit (bytes or pixels)"},
    422: {
        "model": ErrorBody,
        "description": "invalid parameters (k, granularity, min_score, where: bad syntax or a level the index "
        "lacks, the embedding)",
    },
    500: {"model": ErrorBody, "description": "the query encoder is broken (it produced NaN or infinity)"},
    503: {"model": ErrorBody, "description": "busy (too many queries waiting) or still starting; see Retry-After"},
}


def _granularity_checked(engine: SearchEngine, granularity: str | None, min_score: float | None) -> None:
    if granularity is not None and min_score is not None:
        raise HTTPException(status_code=422, detail="give either granularity or min_score, not both")
    if granularity is None:
        return
    try:
        engine.granularity_threshold(granularity)
    except UnknownGranularityError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except NotCalibratedError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _response(
    request: Request,
    answer: Answer,
    k: int,
    encoder_id: str,
    granularity: str | None,
    min_score: float | None,
    where: tuple[LabelFilter, ...],
) -> SearchResponse:
    start = request.scope.get(REQUEST_START_KEY)
    took = (time.perf_counter() - start) * 1000.0 if start is not None else 0.0
    return build_response(answer, k, encoder_id, granularity, min_score, took, where=where)


def build_response(
    answer: Answer,
    k: int,
    encoder_id: str,
    granularity: str | None,
    min_score: float | None,
    took_ms: float,
    where: tuple[LabelFilter, ...] = (),
) -> SearchResponse:
    """The ``SearchResponse`` of one answered query (the last stage ``benchmarks/bench_query_stages.py`` times)."""
    range_search = None
    if answer.range_fallback is not None:
        range_search = "knn_fallback" if answer.range_fallback else "native"
    return SearchResponse(
        k=k,
        took_ms=round(took_ms, 3),
        query_encoder_id=encoder_id,
        granularity=granularity,
        min_score=min_score,
        range_search=range_search,
        where=echo_where(where),
        hits=[Hit.from_hit(hit) for hit in answer.results],
    )


def search_router(settings: ServeSettings, dependencies: list) -> APIRouter:
    """The two search endpoints, with ``k`` bounded by ``settings.max_k`` in their schema."""
    router = APIRouter(prefix="/v1", tags=["search"], dependencies=dependencies)
    max_bytes = settings.max_upload_bytes

    def default_k(min_score: float | None) -> int:
        # with min_score, k caps the hits (default: max_k); otherwise it is the number of nearest items
        return settings.max_k if min_score is not None else settings.default_k

    @router.post("/search", response_model=SearchResponse, responses=_ERRORS, summary="Search with an image")
    async def search_image(
        request: Request,
        engine: Annotated[SearchEngine, Depends(get_engine)],
        batcher: Annotated[MicroBatcher, Depends(get_batcher)],
        gates: Annotated[Gates, Depends(get_gates)],
        image: Annotated[UploadFile, File(description="the query image (JPEG, PNG, WebP, ...)")],
        k: Annotated[
            int | None,
            Form(
                ge=1, le=settings.max_k, description=f"most hits (default {settings.default_k}; max_k with min_score)"
            ),
        ] = None,
        granularity: Annotated[
            str | None, Form(max_length=64, description="a calibrated level: only hits above its threshold")
        ] = None,
        min_score: Annotated[
            float | None, Form(ge=-1.0, le=1.0, description="return every item scoring above this (range search)")
        ] = None,
        where: Annotated[list[str] | None, Form(description=FORM_WHERE_HELP)] = None,
    ) -> SearchResponse:
        _granularity_checked(engine, granularity, min_score)  # answer before reading and decoding the upload
        filters = checked_where(engine, filters_from_form(where))
        images = len((await request.form()).getlist("image"))  # parsed once by FastAPI, cached on the request
        if images > 1:  # otherwise the last part would silently replace the first
            raise HTTPException(status_code=400, detail=f"send one image per request; the form has {images}")
        k = k or default_k(min_score)
        name = image.filename or "<upload>"
        data = await image.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(status_code=413, detail=f"{name}: {too_large_message(max_bytes)}")
        query = ImageQuery(
            data,
            name,
            k,
            granularity,
            min_score,
            max_pixels=settings.max_image_pixels,
            target_size=engine.query_encoder.preprocess.input_size,
            where=filters,
        )
        async with gates.queries.slot():  # OverloadedError (503 + Retry-After) when the queue is full
            try:
                async with gates.decodes.slot():  # its own thread hop: decoded images in memory stay bounded
                    query = await run_in_threadpool(query.decoded)
                answer = await batcher.submit(query)
            except ImageTooLargeError as exc:
                raise HTTPException(status_code=413, detail=str(exc)) from None
            except IndexFormatError:  # a ValueError too, but the server's fault: serving.api.errors answers it
                raise
            except ValueError as exc:  # CorruptImageError: the message names the client's file, not a server path
                raise HTTPException(status_code=400, detail=str(exc)) from None
        return _response(request, answer, k, engine.query_encoder.encoder_id, granularity, min_score, filters)

    @router.post(
        "/search/embedding",
        response_model=SearchResponse,
        responses={
            **_ERRORS,
            409: {"model": ErrorBody, "description": "the vector comes from another encoder's space"},
        },
        summary="Search with a vector embedded on the client",
    )
    async def search_embedding(
        request: Request,
        engine: Annotated[SearchEngine, Depends(get_engine)],
        body: EmbeddingSearchRequest,
    ) -> SearchResponse:
        if body.k is not None and body.k > settings.max_k:
            raise HTTPException(status_code=422, detail=f"k must be at most {settings.max_k}, got {body.k}")
        _granularity_checked(engine, body.granularity, body.min_score)
        filters = checked_where(engine, filters_from_json(body.where))
        try:
            vectors = engine.check_query_vectors(body.embedding, body.encoder_id, body.teacher_id)
        except ForeignEmbeddingError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except QueryVectorError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        k = body.k or default_k(body.min_score)
        answer = await run_in_threadpool(answer_vectors, engine, vectors, k, body.granularity, body.min_score, filters)
        return _response(request, answer, k, body.encoder_id, body.granularity, body.min_score, filters)

    return router
