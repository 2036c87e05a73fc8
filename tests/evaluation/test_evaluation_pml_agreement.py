"""Agreement with pytorch-metric-learning's AccuracyCalculator, on the metrics whose definitions truly match.

What PML 2.x computes (utils/accuracy_calculator.py):

* ``precision_at_1``: fraction of queries whose top neighbour has the query's label, over the queries
  that are not "lone" (lone = no other item of that label in the reference). That is our R@1 hit rate,
  which also leaves out queries without a relevant item.
* ``mean_average_precision``: per query, ``sum over relevant positions i <= k of precision@i``
  divided by the query's *total* number of relevant references, then averaged over non-lone queries.
  With ``k=None`` the k-NN covers the whole reference (minus the query itself), so this is exactly
  our all-positives AP. With ``k="max_bin_count"`` it is truncated at the size of the largest class
  minus one: relevant items ranked beyond that are dropped, so it is *not* all-positives mAP
  (it is a lower bound; checked below).
* Leave-one-out: ``get_accuracy(query, labels)`` without a reference sets ``ref_includes_query=True``
  (PML 2.x's name for the old ``embeddings_come_from_same_source``) and removes each query's own index.

PML ranks with FAISS (L2 on float32) while we rank by float32 inner product; on unit vectors the
orders agree except for near-ties within float32 rounding. The seeds below were chosen so that no two
adjacent items of different relevance are closer than 4e-6 in score (checked in float64), so both
implementations must rank the relevant items identically.
"""

import numpy as np
import pytest
import torch

from retrieval.evaluation import evaluate_embeddings
from retrieval.evaluation.metrics import rank_by_similarity

pytest.importorskip("faiss")
accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

LEVELS = ("fine", "middle", "coarse")
MIN_GAP = 4e-6


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    emb = rng.normal(size=(n, d)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _nested(fine: np.ndarray) -> np.ndarray:
    return np.stack([fine, fine // 3, fine // 12], axis=1).astype(np.int64)


def _ranked_relevance_f64(queries, q_labels, gallery, g_labels, leave_one_out):
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    exclude = np.eye(len(queries), dtype=bool) if leave_one_out else None
    ranking = rank_by_similarity(scores, exclude)
    ranked_scores = np.take_along_axis(scores, ranking, axis=1)
    relevance = [g_labels[ranking, k] == q_labels[:, k, None] for k in range(q_labels.shape[1])]
    return ranked_scores, relevance


def _assert_no_near_ties(ranked_scores, relevance):
    for rel in relevance:
        boundary = rel[:, 1:] != rel[:, :-1]
        gaps = (ranked_scores[:, :-1] - ranked_scores[:, 1:])[boundary]
        assert gaps.min() > MIN_GAP, "test data has near-ties between relevant and irrelevant items; change the seed"


def _pml(k, queries, q_labels, gallery=None, g_labels=None):
    calculator = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision"), k=k, device=torch.device("cpu")
    )
    results = []
    for column in range(q_labels.shape[1]):
        if gallery is None:
            results.append(calculator.get_accuracy(queries, q_labels[:, column]))
        else:
            results.append(calculator.get_accuracy(queries, q_labels[:, column], gallery, g_labels[:, column]))
    return results


def test_leave_one_out_matches_pml():
    rng = np.random.default_rng(12)
    emb = _unit(rng, 100, 8)
    labels = _nested(rng.integers(0, 25, size=100))
    counts = np.bincount(labels[:, 0])
    assert (counts == 1).any(), "want singleton fine classes so PML's lone-query exclusion is exercised"
    _assert_no_near_ties(*_ranked_relevance_f64(emb, labels, emb, labels, leave_one_out=True))

    ours = evaluate_embeddings(emb, labels, ks=(1,), batch_size=32)
    pml = _pml(None, emb, labels)
    for level, theirs in zip(LEVELS, pml, strict=True):
        assert ours.per_level[level]["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
        assert ours.per_level[level]["mAP"] == pytest.approx(theirs["mean_average_precision"], abs=1e-12)
    assert ours.counted["fine"] == int((counts[labels[:, 0]] > 1).sum()) < 100


def test_gallery_mode_matches_pml():
    rng = np.random.default_rng(12)
    queries, gallery = _unit(rng, 50, 8), _unit(rng, 120, 8)
    q_labels, g_labels = _nested(rng.integers(0, 36, size=50)), _nested(rng.integers(0, 30, size=120))
    assert not np.isin(q_labels[:, 0], g_labels[:, 0]).all(), "want queries whose class is absent from the gallery"
    _assert_no_near_ties(*_ranked_relevance_f64(queries, q_labels, gallery, g_labels, leave_one_out=False))

    ours = evaluate_embeddings(queries, q_labels, gallery, g_labels, ks=(1,), batch_size=16)
    pml = _pml(None, queries, q_labels, gallery, g_labels)
    for level, theirs in zip(LEVELS, pml, strict=True):
        assert ours.per_level[level]["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
        assert ours.per_level[level]["mAP"] == pytest.approx(theirs["mean_average_precision"], abs=1e-12)


def test_pml_max_bin_count_is_truncated_not_all_positives():
    rng = np.random.default_rng(12)
    emb = _unit(rng, 100, 8)
    labels = _nested(rng.integers(0, 25, size=100))
    ranked_scores, relevance = _ranked_relevance_f64(emb, labels, emb, labels, leave_one_out=True)
    _assert_no_near_ties(ranked_scores, relevance)
    ours = evaluate_embeddings(emb, labels, ks=(1,))
    pml = _pml("max_bin_count", emb, labels)
    for column, level in enumerate(LEVELS):
        rel = relevance[column]
        depth = int(np.bincount(labels[:, column]).max()) - 1  # PML's k for max_bin_count, leave-one-out
        positives = rel.sum(axis=1)
        valid = positives > 0
        cumulative = np.cumsum(rel[:, :depth], axis=1)
        precision_sums = (cumulative * rel[:, :depth] / np.arange(1, depth + 1)).sum(axis=1)
        truncated = (precision_sums[valid] / positives[valid]).mean()
        assert pml[column]["mean_average_precision"] == pytest.approx(truncated, abs=1e-12)
        assert pml[column]["mean_average_precision"] < ours.per_level[level]["mAP"]
