"""The DyML evaluation protocol: each granularity scored on its own query/gallery sets, then averaged.

Dynamic Metric Learning (Sun et al., CVPR 2021) asks one embedding space to serve several semantic
scales. Its benchmarks (DyML-Vehicle, -Animal, -Product) ship separate query and gallery lists per
level (``bmk_fine``, ``bmk_middle``, ``bmk_coarse``); at each level an item is relevant to a query
when it has the same label *at that level*. Each level is scored with mAP (all positives), R@K as
the hit rate, and ASI (:func:`~retrieval.evaluation.metrics.average_search_index`); the overall row
is the unweighted mean of the levels.

The metric never sees the query's level: the same embeddings function serves every level, and a
query is ranked against its gallery by plain inner product whatever the level being scored. Only
the labels (and so the relevance) change from level to level. That is the point of the benchmark:
a model may not switch to a level-specific head when told which granularity is asked.

Embeddings can be stored as one ``.npz`` file (:func:`save_dyml_embeddings`), so an expensive
extraction runs once and the protocol can be re-run, or run elsewhere, without the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UserFacingError
from retrieval.evaluation.protocols import check_report_ks, evaluate_embeddings
from retrieval.evaluation.report import EvaluationReport

__all__ = [
    "DYML_KS",
    "DymlEmbeddingsError",
    "DymlLevelEmbeddings",
    "evaluate_dyml",
    "load_dyml_embeddings",
    "save_dyml_embeddings",
]

DYML_KS: tuple[int, ...] = (1, 10, 20)
"""The Recall@K cut-offs the DyML paper reports."""

_LEVELS_KEY = "levels"
_ARRAYS = ("query", "query_labels", "gallery", "gallery_labels", "exclude_self")
_LEVEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class DymlEmbeddingsError(UserFacingError, ValueError):
    """A DyML embeddings file that cannot be used; the message names the file and the array."""


@dataclass(frozen=True)
class DymlLevelEmbeddings:
    """The embeddings and labels needed to score one DyML level.

    Attributes:
        level: the level's name (``"fine"``, ``"middle"``, ``"coarse"``); letters, digits, ``_.-``.
        query: ``(Q, D)`` L2-normalised query embeddings.
        query_labels: ``(Q,)`` integer class ids of the queries *at this level*.
        gallery: ``(G, D)`` gallery embeddings in the same space, or ``None`` for leave-one-out over
            the queries (each query ranks all the other queries; the DyML-Product layout).
        gallery_labels: ``(G,)`` integer class ids at this level; given exactly when ``gallery`` is.
        exclude_self: gallery item ``i`` is query item ``i`` embedded by another encoder (asymmetric
            evaluation of a leave-one-out level: student queries, teacher gallery of the same images);
            query ``i`` then never ranks gallery item ``i``. Needs a gallery of the queries' length.

    Raises:
        ValueError: on wrong ranks, mismatched lengths or dimensions, non-integer labels, a
            gallery without labels (or labels without a gallery), or ``exclude_self`` without a
            gallery of the queries' length.
    """

    level: str
    query: np.ndarray
    query_labels: np.ndarray
    gallery: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None
    exclude_self: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.level, str) or not _LEVEL_NAME.match(self.level):
            raise ValueError(f"level name must be letters, digits, '_', '.' or '-', got {self.level!r}")
        where = f"level {self.level!r}"
        query = np.asarray(self.query)
        if query.ndim != 2:
            raise ValueError(f"{where}: query must have shape (Q, D), got {query.shape}")
        _check_labels(self.query_labels, len(query), f"{where}: query_labels", "query")
        if (self.gallery is None) != (self.gallery_labels is None):
            raise ValueError(f"{where}: gallery and gallery_labels must be given together (or both None)")
        if self.gallery is not None:
            gallery = np.asarray(self.gallery)
            if gallery.ndim != 2:
                raise ValueError(f"{where}: gallery must have shape (G, D), got {gallery.shape}")
            if gallery.shape[1] != query.shape[1]:
                raise ValueError(
                    f"{where}: query has dimension {query.shape[1]} but gallery has {gallery.shape[1]}; "
                    "both must be embedded in the same space"
                )
            _check_labels(self.gallery_labels, len(gallery), f"{where}: gallery_labels", "gallery")
        if self.exclude_self and (self.gallery is None or len(np.asarray(self.gallery)) != len(query)):
            raise ValueError(f"{where}: exclude_self needs a gallery of the same items as the queries ({len(query)})")

    @property
    def leave_one_out(self) -> bool:
        """True when each query searches the other items of its own set (no gallery, or ``exclude_self``)."""
        return self.gallery is None or self.exclude_self


def _check_labels(labels: object, expected: int, name: str, rows_of: str) -> None:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) (one id per item at this level), got {array.shape}")
    if len(array) != expected:
        raise ValueError(f"{name} has {len(array)} entries but {rows_of} has {expected} rows")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")


def evaluate_dyml(
    levels: Sequence[DymlLevelEmbeddings],
    ks: Sequence[int] = DYML_KS,
    batch_size: int = 1024,
) -> EvaluationReport:
    """Score each DyML level on its own query/gallery sets; the overall row is the mean of the levels.

    Per level: relevance = same label at that level; metrics ``R@K`` (hit rate, one per K), ``mAP``
    (all positives) and ``ASI``, in that column order. Queries with no relevant item at their level
    are left out of that level's means (``report.counted``). Ranking is by inner product of the
    given embeddings, identical for every level: the level only changes which items count as
    relevant (see the module docstring).

    Memory: each level goes through :func:`~retrieval.evaluation.protocols.evaluate_embeddings`,
    which ranks ``batch_size`` queries at a time, so the working set is about
    ``batch_size x G x 21`` bytes plus the chunk's positives (about 1.3 GB for the default 1024
    queries against a 60 000-image gallery), never a dense ``Q x G`` matrix. Lower ``batch_size``
    for larger galleries; the results do not depend on it.

    Args:
        levels: one entry per level, in report order (finest first by convention); names unique.
        ks: Recall@K cut-offs, distinct positive integers; the paper reports 1, 10 and 20.
        batch_size: queries per similarity chunk.

    Returns:
        An :class:`EvaluationReport` with one row per level and their unweighted mean.
        ``num_queries`` is the number of queries summed over the levels (a query set shared by
        several levels counts once per level); ``counted`` is per level.

    Raises:
        ValueError: no levels, a repeated level name, bad ``ks`` or ``batch_size``, or a level
            :func:`evaluate_embeddings` rejects (e.g. an empty query set).
    """
    levels = list(levels)
    if not levels:
        raise ValueError("evaluate_dyml needs at least one level")
    names = [entry.level for entry in levels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"level names must be unique, repeated: {', '.join(repeated)}")
    ks = check_report_ks(ks)
    per_level: dict[str, dict[str, float]] = {}
    counted: dict[str, int] = {}
    total_queries = 0
    for entry in levels:
        try:
            report = evaluate_embeddings(
                entry.query,
                entry.query_labels,
                entry.gallery,
                entry.gallery_labels,
                schema=(entry.level,),
                ks=ks,
                batch_size=batch_size,
                asi=True,
                exclude_self=entry.exclude_self,
            )
        except ValueError as exc:
            raise ValueError(f"level {entry.level!r}: {exc}") from exc
        per_level[entry.level] = report.per_level[entry.level]
        counted[entry.level] = report.counted[entry.level]
        total_queries += report.num_queries
    return EvaluationReport.from_levels(per_level, num_queries=total_queries, counted=counted)


def save_dyml_embeddings(path: str | Path, levels: Sequence[DymlLevelEmbeddings]) -> Path:
    """Write the levels' embeddings and labels to one uncompressed ``.npz`` file.

    Keys are ``levels`` (the level names, in order) and ``<level>/query``, ``<level>/query_labels``,
    plus ``<level>/gallery`` and ``<level>/gallery_labels`` for levels with a gallery, and a boolean
    ``<level>/exclude_self`` for an asymmetric leave-one-out level. Embeddings are
    stored as float32 and labels as int64; nothing is pickled. ``np.savez`` appends ``.npz`` to a
    path without that suffix; the returned path is the file actually written.

    Raises:
        ValueError: no levels, or a repeated level name.
    """
    levels = list(levels)
    if not levels:
        raise ValueError("save_dyml_embeddings needs at least one level")
    names = [entry.level for entry in levels]
    if len(set(names)) != len(names):
        raise ValueError(f"level names must be unique, got {names}")
    arrays: dict[str, np.ndarray] = {_LEVELS_KEY: np.array(names, dtype=np.str_)}
    for entry in levels:
        arrays[f"{entry.level}/query"] = np.asarray(entry.query, dtype=np.float32)
        arrays[f"{entry.level}/query_labels"] = np.asarray(entry.query_labels, dtype=np.int64)
        if entry.gallery is not None:
            arrays[f"{entry.level}/gallery"] = np.asarray(entry.gallery, dtype=np.float32)
            arrays[f"{entry.level}/gallery_labels"] = np.asarray(entry.gallery_labels, dtype=np.int64)
        if entry.exclude_self:
            arrays[f"{entry.level}/exclude_self"] = np.array(True)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_dyml_embeddings(path: str | Path) -> list[DymlLevelEmbeddings]:
    """Read a file written by :func:`save_dyml_embeddings` (never unpickling anything).

    Raises:
        FileNotFoundError: the file does not exist.
        DymlEmbeddingsError: (a ``ValueError``) not an ``.npz`` archive, no ``levels`` key, a level
            missing its ``query``/``query_labels`` array or having only one of ``gallery`` and
            ``gallery_labels``, an unknown key, or arrays whose shapes do not fit together (the
            message names the file, the level and the array).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DymlEmbeddingsError(f"{path}: not a DyML embeddings .npz file ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DymlEmbeddingsError(f"{path}: expected an .npz archive of arrays, found a single array")
    with archive:
        keys = set(archive.files)
        if _LEVELS_KEY not in keys:
            raise DymlEmbeddingsError(f"{path}: missing the {_LEVELS_KEY!r} array naming the levels")
        names = _read(archive, path, _LEVELS_KEY)
        if names.ndim != 1 or names.size == 0 or not np.issubdtype(names.dtype, np.str_):
            raise DymlEmbeddingsError(f"{path}: {_LEVELS_KEY!r} must be a non-empty 1-D array of level names")
        names = [str(name) for name in names]
        if len(set(names)) != len(names):
            raise DymlEmbeddingsError(f"{path}: level names repeat: {', '.join(names)}")
        expected = {_LEVELS_KEY} | {f"{name}/{array}" for name in names for array in _ARRAYS}
        unknown = sorted(keys - expected)
        if unknown:
            raise DymlEmbeddingsError(f"{path}: unexpected arrays {', '.join(unknown)} (levels: {', '.join(names)})")
        levels = []
        for name in names:
            for required in ("query", "query_labels"):
                if f"{name}/{required}" not in keys:
                    raise DymlEmbeddingsError(f"{path}: level {name!r} has no {name}/{required} array")
            gallery = _read(archive, path, f"{name}/gallery") if f"{name}/gallery" in keys else None
            gallery_labels = (
                _read(archive, path, f"{name}/gallery_labels") if f"{name}/gallery_labels" in keys else None
            )
            flag = f"{name}/exclude_self"
            exclude_self = _read_flag(archive, path, flag) if flag in keys else False
            try:
                levels.append(
                    DymlLevelEmbeddings(
                        level=name,
                        query=_read(archive, path, f"{name}/query"),
                        query_labels=_read(archive, path, f"{name}/query_labels"),
                        gallery=gallery,
                        gallery_labels=gallery_labels,
                        exclude_self=exclude_self,
                    )
                )
            except ValueError as exc:
                raise DymlEmbeddingsError(f"{path}: {exc}") from None
    return levels


def _read(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DymlEmbeddingsError(f"{path}: cannot read array {key!r} without unpickling ({exc})") from None


def _read_flag(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> bool:
    value = _read(archive, path, key)
    if value.shape != () or value.dtype != np.bool_:
        raise DymlEmbeddingsError(f"{path}: {key!r} must be a single boolean, got {value.dtype} {value.shape}")
    return bool(value)
