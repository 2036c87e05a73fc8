"""Which index a build makes, and the record of that choice: shared by the in-memory build and the streaming merge.

``make_index`` (``indexing.builder``) fills an index from vectors in memory; ``stream_index``
(``indexing.streaming_merge``) fills one chunk file at a time. Both decide the index type the same way
(``resolve_factory``), check the same options before any expensive work (``check_index_options``) and return
the same ``BuiltIndex``, so a streamed merge and a single build record identical manifests.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from indexing.faiss_tuning import TuneResult
from indexing.index_factory import choose_factory, default_memory_budget, parse_size
from indexing.vector_index import DEFAULT_BACKEND, VectorIndex, backend_class
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError
from retrieval.data.images import SkipReport

__all__ = [
    "AUTO_FACTORY",
    "TUNE_QUERIES",
    "BuiltIndex",
    "check_index_options",
    "check_some_readable",
    "log_tuning",
    "resolve_factory",
]

logger = logging.getLogger(__name__)

#: ``factory`` value that lets ``choose_factory`` pick the index type from the gallery size and memory budget.
AUTO_FACTORY = "auto"
#: Gallery embeddings used as queries when tuning an approximate index.
TUNE_QUERIES = 500


@dataclass(frozen=True)
class BuiltIndex:
    """A filled index, the factory it was made with and why, and how it was tuned.

    Attributes:
        index: trained, filled and (when approximate) tuned; its default search parameters are the tuned ones.
        factory: the factory string used.
        reason: why: ``choose_factory``'s explanation for "auto", otherwise that it was given.
        tuning: ``FaissIndex.tune``'s result, or None for exact search (Flat) or a single vector.
    """

    index: VectorIndex
    factory: str
    reason: str
    tuning: TuneResult | None

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest fields describing this index: factory, factory_reason, search_params, tuning."""
        tuning = None
        if self.tuning is not None:
            tuning = {key: value for key, value in asdict(self.tuning).items() if key != "params"}
        params = self.tuning.params.to_dict() if self.tuning is not None else {}
        return {
            "factory": self.factory,
            "factory_reason": self.reason,
            "search_params": params or None,
            "tuning": tuning,
        }


def resolve_factory(factory: str, memory_budget: int | str | None, num_vectors: int, dim: int) -> tuple[str, str]:
    """``(factory, reason)``: ``choose_factory`` for "auto" (budget: given or half the RAM), else the given one.

    Raises:
        ConfigError: a bad budget (or one with an explicit factory), or one too small for any index.
    """
    budget = parse_budget(memory_budget, factory)
    if factory != AUTO_FACTORY:
        return factory, "given explicitly (not chosen automatically)"
    note = None
    if budget is None:
        budget, note = default_memory_budget(), "the default: half of this machine's RAM; --memory-budget sets it"
    try:
        choice = choose_factory(num_vectors, dim, budget, budget_note=note)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return choice.factory, f"auto: {choice.reason}"


def parse_budget(memory_budget: int | str | None, factory: str) -> int | None:
    """The memory budget in bytes (None when not given); only "auto" takes one.

    Raises:
        ConfigError: a budget with an explicit factory, unreadable text, or a non-positive size.
    """
    if memory_budget is None:
        return None
    if factory != AUTO_FACTORY:
        raise ConfigError(f"a memory budget only applies to factory 'auto', not to the given factory {factory!r}")
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    if budget <= 0:
        raise ConfigError(f"memory budget must be positive, got {memory_budget!r}")
    return budget


def check_target_recall(target_recall: float) -> None:
    """Refuse a target recall outside (0, 1]."""
    if not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")


def check_index_options(
    factory: str, memory_budget: int | str | None, target_recall: float, backend: str = DEFAULT_BACKEND
) -> None:
    """Bad index options fail before the extraction, not after it."""
    backend_class(backend)  # an unknown backend lists the valid ones
    if backend != DEFAULT_BACKEND and memory_budget is not None:
        raise ConfigError(f"--memory-budget sizes FAISS indexes; the {backend} backend sizes its own")
    parse_budget(memory_budget, factory)
    check_target_recall(target_recall)


def log_tuning(factory: str, tuning: TuneResult) -> None:
    """Log what tuning chose and the recall it measured (the build summary and manifest carry the same)."""
    logger.info(
        "tuned %s: %s, recall@%d %.3f on %d held-out queries",
        factory,
        tuning.params.to_dict(),
        tuning.k,
        tuning.recall,
        tuning.num_queries,
    )


def check_some_readable(count: int, skipped: SkipReport, gallery_count: int) -> None:
    """An index of nothing helps no one: when no image was readable, say which failed and why.

    Raises:
        DatasetError: ``count`` is 0.
    """
    if count == 0:
        examples = "; ".join(f"{path}: {reason}" for path, reason in skipped.skipped[:3])
        raise DatasetError(f"none of the {gallery_count} images could be read (e.g. {examples})")
