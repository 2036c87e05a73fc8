"""Retrieval evaluation: pure ranking metrics, an immutable report, and the query/gallery protocols.

Everything here is numpy-only and imports no stage, so training, indexing and the CLI can all
score embeddings the same way.
"""

from retrieval.evaluation.asymmetric import evaluate_asymmetric
from retrieval.evaluation.metrics import (
    RankWorkspace,
    average_precision,
    check_ks,
    first_relevant_rank,
    hits_at_k,
    mean_average_precision,
    rank_by_similarity,
    ranked_relevance,
    recall_at_k,
    relevance_of_ranking,
)
from retrieval.evaluation.protocols import evaluate_embeddings
from retrieval.evaluation.report import EvaluationReport, format_side_by_side

__all__ = [
    "EvaluationReport",
    "RankWorkspace",
    "average_precision",
    "check_ks",
    "evaluate_asymmetric",
    "evaluate_embeddings",
    "first_relevant_rank",
    "format_side_by_side",
    "hits_at_k",
    "mean_average_precision",
    "rank_by_similarity",
    "ranked_relevance",
    "recall_at_k",
    "relevance_of_ranking",
]
