"""SearchResults is a validated value: sorted scores, unique ids, JSON form."""

from __future__ import annotations

import pytest

from indexing.results import SearchHit, SearchResults


def test_valid_results_and_their_dict_form():
    res = SearchResults([SearchHit(3, 0.9, "a.png", {"fine": "x"}), SearchHit(1, 0.9 + 5e-7), SearchHit(2, -0.2)])
    assert isinstance(res.hits, tuple) and len(res) == 3
    assert res.ids == [3, 1, 2]
    assert res.to_dict() == {
        "hits": [
            {"id": 3, "score": 0.9, "path": "a.png", "labels": {"fine": "x"}},
            {"id": 1, "score": 0.9 + 5e-7, "path": None, "labels": {}},
            {"id": 2, "score": -0.2, "path": None, "labels": {}},
        ]
    }
    with pytest.raises(AttributeError):
        res.hits = ()  # frozen


def test_unsorted_scores_are_rejected():
    with pytest.raises(ValueError, match="not sorted: hit 1"):
        SearchResults((SearchHit(1, 0.5), SearchHit(2, 0.6)))


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match=r"duplicate ids: \[4\]"):
        SearchResults((SearchHit(4, 0.5), SearchHit(4, 0.4)))


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        SearchResults((SearchHit(4, float("nan")),))


def test_without_ids_and_top_keep_the_ranking():
    results = SearchResults(tuple(SearchHit(id=i, score=1.0 - 0.1 * i) for i in range(5)))
    trimmed = results.without_ids({0, 3}).top(2)
    assert trimmed.ids == [1, 2]
    assert results.top(10).ids == [0, 1, 2, 3, 4]
