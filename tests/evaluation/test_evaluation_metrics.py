"""Hand-worked rankings for the pure metric functions (R@K hit rate, all-positives AP, ties, exclusion)."""

import numpy as np
import pytest

from retrieval.evaluation.metrics import (
    RankWorkspace,
    average_precision,
    first_relevant_rank,
    hits_at_k,
    mean_average_precision,
    rank_by_similarity,
    ranked_relevance,
    recall_at_k,
    relevance_of_ranking,
)

# Rows are queries, columns rank positions 1..5, 1 = relevant.
HAND = np.array(
    [
        [0, 1, 1, 0, 1],  # q0: positives at ranks 2, 3, 5
        [1, 0, 0, 0, 0],  # q1: one positive, at rank 1
        [0, 0, 0, 0, 0],  # q2: no positive -> left out of every mean
        [0, 0, 0, 1, 1],  # q3: positives at ranks 4, 5
    ],
    dtype=bool,
)
# AP(q0) = (1/2 + 2/3 + 3/5) / 3 = (0.5 + 0.666667 + 0.6) / 3 = 0.588889
# AP(q1) = (1/1) / 1 = 1
# AP(q3) = (1/4 + 2/5) / 2 = (0.25 + 0.4) / 2 = 0.325
AP_Q0 = (1 / 2 + 2 / 3 + 3 / 5) / 3
AP_Q3 = (1 / 4 + 2 / 5) / 2


def test_average_precision_hand_worked():
    ap = average_precision(HAND)
    np.testing.assert_allclose(ap[[0, 1, 3]], [AP_Q0, 1.0, AP_Q3], rtol=0, atol=1e-15)
    assert np.isnan(ap[2])
    assert ap[0] == pytest.approx(0.588889, abs=1e-6)
    # mAP over the three queries that have positives: (0.588889 + 1 + 0.325) / 3 = 0.637963
    assert mean_average_precision(HAND) == pytest.approx((AP_Q0 + 1.0 + AP_Q3) / 3, abs=1e-15)
    assert mean_average_precision(HAND) == pytest.approx(0.637963, abs=1e-6)


def test_recall_at_k_is_hit_rate_over_queries_with_positives():
    # First positive (1-based): q0 at 2, q1 at 1, q3 at 4; q2 has none and is excluded.
    assert recall_at_k(HAND, 1) == pytest.approx(1 / 3)  # only q1
    assert recall_at_k(HAND, 2) == pytest.approx(2 / 3)  # q0, q1
    assert recall_at_k(HAND, 3) == pytest.approx(2 / 3)
    assert recall_at_k(HAND, 4) == pytest.approx(1.0)  # q0, q1, q3
    assert recall_at_k(HAND, 100) == pytest.approx(1.0)  # K beyond the ranking = anywhere
    # Hit rate, not recall of items: q0 has 3 positives but one in the top 2 already counts as a full hit.
    np.testing.assert_array_equal(first_relevant_rank(HAND), [1, 0, -1, 3])
    np.testing.assert_array_equal(
        hits_at_k(HAND, [1, 2, 4]),
        [[False, True, True], [True, True, True], [False, False, False], [False, False, True]],
    )


def test_no_query_with_positive_gives_nan():
    empty = np.zeros((3, 4), dtype=bool)
    assert np.isnan(recall_at_k(empty, 1))
    assert np.isnan(mean_average_precision(empty))
    assert np.isnan(average_precision(empty)).all()


def test_ap_counts_all_positives_not_map_at_r():
    # 2 positives at ranks 1 and 4. All-positives AP = (1/1 + 2/4) / 2 = 0.75.
    # MAP@R (R = 2) would only look at ranks 1..2: (1/1) / 2 = 0.5. AP@1 would be 1.0.
    rel = np.array([[1, 0, 0, 1, 0]], dtype=bool)
    assert average_precision(rel)[0] == pytest.approx(0.75)


def test_ties_broken_by_lower_gallery_index():
    # Items 1 and 2 tie at 0.9. Stable rule -> ranking [1, 2, 0, 3].
    scores = np.array([[0.5, 0.9, 0.9, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(rank_by_similarity(scores), [[1, 2, 0, 3]])
    query = np.array([7])
    # Gallery labels [7, 3, 7, 7]: ranked labels [3, 7, 7, 7] -> relevance [0, 1, 1, 1]
    # R@1 = 0; AP = (1/2 + 2/3 + 3/4) / 3 = 0.638889
    rel = ranked_relevance(scores, query, np.array([7, 3, 7, 7]))
    np.testing.assert_array_equal(rel, [[False, True, True, True]])
    assert recall_at_k(rel, 1) == 0.0
    assert average_precision(rel)[0] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    # Swap which tied item is relevant: gallery labels [7, 7, 3, 7] -> relevance [1, 0, 1, 1]
    # R@1 = 1; AP = (1/1 + 2/3 + 3/4) / 3 = 0.805556. The tie rule follows the index, not the label.
    rel = ranked_relevance(scores, query, np.array([7, 7, 3, 7]))
    np.testing.assert_array_equal(rel, [[True, False, True, True]])
    assert recall_at_k(rel, 1) == 1.0
    assert average_precision(rel)[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_all_equal_scores_rank_in_index_order():
    scores = np.zeros((3, 6), dtype=np.float32)
    np.testing.assert_array_equal(rank_by_similarity(scores), np.tile(np.arange(6), (3, 1)))


def test_exclude_mask_removes_items_from_ranking():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]], dtype=np.float32)
    exclude = np.array([[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(rank_by_similarity(scores, exclude), [[2, 1], [2, 0]])
    # Item 0 is the top hit for query 0 but is excluded (e.g. the query itself): relevance skips it.
    rel = ranked_relevance(scores, np.array([1, 5]), np.array([1, 5, 1]), exclude)
    np.testing.assert_array_equal(rel, [[True, False], [False, False]])


def test_exclude_mask_must_be_rectangular():
    scores = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="same number"):
        rank_by_similarity(scores, np.array([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="shape"):
        rank_by_similarity(scores, np.zeros((2, 2), dtype=bool))


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        rank_by_similarity(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k(HAND, 0)
    with pytest.raises(ValueError, match="1-D"):
        relevance_of_ranking(np.zeros((1, 2), dtype=np.int64), np.zeros((1, 2)), np.zeros(2))


def test_vectorised_ap_matches_loop_on_random_relevance():
    rng = np.random.default_rng(3)
    rel = rng.random((50, 40)) < 0.15
    for row, value in zip(rel, average_precision(rel), strict=True):
        positives = np.flatnonzero(row)
        if positives.size == 0:
            assert np.isnan(value)
            continue
        expected = np.mean([(j + 1) / (rank + 1) for j, rank in enumerate(positives)])
        assert value == pytest.approx(expected, abs=1e-14)


def test_packed_float32_ranking_matches_stable_argsort():
    # Many exact ties, signed zeros and infinities: the packed-key sort must equal a stable argsort.
    rng = np.random.default_rng(5)
    scores = (rng.integers(-4, 5, size=(40, 60)) / 4).astype(np.float32)
    scores[:, ::7] = -0.0
    scores[:3, :2] = np.inf
    scores[3:6, 2:4] = -np.inf
    expected = np.argsort(-(scores + np.float32(0.0)), axis=1, kind="stable")
    np.testing.assert_array_equal(rank_by_similarity(scores), expected)
    # The float64 path (stable argsort) agrees with the float32 path on the same values.
    np.testing.assert_array_equal(rank_by_similarity(scores.astype(np.float64)), expected)
    # Signed zeros tie: -0.0 at index 0 stays ahead of 0.0 at index 1 and vice versa.
    np.testing.assert_array_equal(rank_by_similarity(np.array([[-0.0, 0.0, -1.0]], np.float32)), [[0, 1, 2]])
    np.testing.assert_array_equal(rank_by_similarity(np.array([[0.0, -0.0, -1.0]], np.float32)), [[0, 1, 2]])


def test_exclude_by_index_and_workspace_reuse():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(5, 8)).astype(np.float32)
    scores[np.arange(5), np.arange(5)] = 10.0  # "self" would be ranked first
    mask = np.zeros(scores.shape, dtype=bool)
    mask[np.arange(5), np.arange(5)] = True
    expected = rank_by_similarity(scores.astype(np.float64), mask)  # stable-argsort path
    assert not (expected == np.arange(5)[:, None]).any()
    workspace = RankWorkspace()
    np.testing.assert_array_equal(rank_by_similarity(scores, np.arange(5), workspace=workspace), expected)
    np.testing.assert_array_equal(rank_by_similarity(scores, mask, workspace=workspace), expected)
    # A smaller chunk reuses the same buffers and must not see stale rows.
    np.testing.assert_array_equal(rank_by_similarity(scores[:2], np.arange(2), workspace=workspace), expected[:2])
    with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
        rank_by_similarity(scores, np.array([0, 1, 2, 3, 8]))
