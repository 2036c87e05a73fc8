"""Label filters (``where``) of the search endpoints: read from the request, checked, echoed in the answer.

The two endpoints take the same filters in the form their transport suits: the image search repeats a
multipart form field (``where=coarse=shoes``, ``where=middle=sneakers,boots``), the embedding search a JSON
object (``{"coarse": ["shoes"], "middle": ["sneakers", "boots"]}``). Both become ``LabelFilter`` tuples
(all must match), and both answers echo them as the JSON object. Each level may be given once, so the two
forms say the same thing; several accepted values of one level go in one filter.

Everything here runs before any upload is read or any vector searched: bad syntax is a 422 with the
syntax, a level the index lacks a 422 naming the index's levels (as an unknown granularity is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import HTTPException

from indexing.errors import UnknownLevelError
from indexing.vector_index import LabelFilter
from serving.api.schemas import MAX_FILTER_LEVELS, MAX_FILTER_VALUES, MAX_LEVEL_LENGTH, MAX_VALUE_LENGTH
from serving.engine import SearchEngine

__all__ = ["FORM_WHERE_HELP", "checked_where", "echo_where", "filters_from_form", "filters_from_json"]

FORM_WHERE_HELP = (
    "only items whose label matches: LEVEL=VALUE or LEVEL=V1,V2 (any of the values), e.g. coarse=shoes; repeat "
    "the field for several levels (all must match; each level once). Levels: GET /v1/index 'levels'. The hits "
    "are the best k among the matching items"
)


def filters_from_form(values: Sequence[str] | None) -> tuple[LabelFilter, ...]:
    """The filters of the image search's repeated ``where`` form fields.

    Raises:
        HTTPException: 422 for a value that is not ``LEVEL=V1[,V2...]``, a level given twice, or too many or
            too long levels or values.
    """
    filters = []
    for text in values or ():
        try:
            filters.append(LabelFilter.parse(text))
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"where: {exc}") from None
    return _bounded(filters)


def filters_from_json(where: Mapping[str, Sequence[str]] | None) -> tuple[LabelFilter, ...]:
    """The filters of the embedding search's ``where`` object (pydantic already checked its shape and bounds)."""
    return _bounded([LabelFilter(level, tuple(values)) for level, values in (where or {}).items()])


def _bounded(filters: list[LabelFilter]) -> tuple[LabelFilter, ...]:
    """``filters`` checked against the API's bounds (``serving.api.schemas``), each level once."""
    levels = [one.level for one in filters]
    if len(levels) != len(set(levels)):
        twice = next(level for level in levels if levels.count(level) > 1)
        raise HTTPException(
            status_code=422,
            detail=f"where: level {twice!r} is given twice; list its accepted values once, as {twice}=V1,V2",
        )
    if len(filters) > MAX_FILTER_LEVELS:
        raise HTTPException(status_code=422, detail=f"where: at most {MAX_FILTER_LEVELS} levels, got {len(filters)}")
    for one in filters:
        if len(one.level) > MAX_LEVEL_LENGTH:
            raise HTTPException(
                status_code=422, detail=f"where: a level name has at most {MAX_LEVEL_LENGTH} characters"
            )
        if len(one.values) > MAX_FILTER_VALUES:
            raise HTTPException(
                status_code=422, detail=f"where: at most {MAX_FILTER_VALUES} values per level, got {len(one.values)}"
            )
        if any(len(value) > MAX_VALUE_LENGTH for value in one.values):
            raise HTTPException(status_code=422, detail=f"where: a value has at most {MAX_VALUE_LENGTH} characters")
    return tuple(filters)


def checked_where(engine: SearchEngine, filters: tuple[LabelFilter, ...]) -> tuple[LabelFilter, ...]:
    """``filters``, each on a level of the served index; 422 naming the index's levels otherwise."""
    try:
        return engine.check_where(filters)
    except UnknownLevelError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def echo_where(filters: Sequence[LabelFilter]) -> dict[str, list[str]] | None:
    """The filters as the answer's ``where`` object (``{level: [values]}``), or None for an unfiltered search."""
    return {one.level: list(one.values) for one in filters} or None
