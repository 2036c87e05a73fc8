"""Revisited Oxford/Paris protocol: hand-worked AP and mP@k, setups, and a loop-based official compute_map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retrieval.evaluation.revisited import (
    SETUPS,
    RevisitedReport,
    adjusted_positive_ranks,
    evaluate_revisited,
    precision_at_ks,
    revisited_ap,
    revisited_ap_from_scores,
    setup_judgements,
)


def _gt(easy=(), hard=(), junk=()) -> dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=np.int64) for key, value in (("easy", easy), ("hard", hard), ("junk", junk))}


def _embeddings_for(scores: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Query q = basis vector e_q, database item i = column i of ``scores``: inner products are ``scores``."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.eye(len(scores), dtype=np.float32), np.ascontiguousarray(scores.T)


def _scores_for_ranking(order: list[int]) -> list[float]:
    """Similarities that rank the database in ``order`` (first = most similar)."""
    scores = [0.0] * len(order)
    for rank, item in enumerate(order):
        scores[item] = 1.0 - rank / 16
    return scores


# --- AP on hand-written rankings ------------------------------------------------------------------


def test_junk_before_between_and_after_positives():
    # ranking   : 5   2   0   7   1   3   6   4
    # role      : J   P   .   J   P   .   .   J
    # adjusted  : -   0   -   -   2             (2 has one junk before it, 1 has two)
    # AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 2 = (1 + 7/12) / 2 = 19/24
    ranking = np.array([5, 2, 0, 7, 1, 3, 6, 4])
    assert adjusted_positive_ranks(ranking, np.array([1, 2]), np.array([4, 5, 7])).tolist() == [0, 2]
    assert revisited_ap(ranking, [2, 1], [5, 7, 4]) == pytest.approx(19 / 24)
    # junk after the last positive changes nothing; junk before a positive lifts it
    assert revisited_ap(ranking, [2, 1], [5, 7]) == pytest.approx(19 / 24)
    # without junk: positives at 1 and 4 -> [(0 + 1/2)/2 + (1/4 + 2/5)/2] / 2 = (1/4 + 13/40) / 2 = 23/80
    assert revisited_ap(ranking, [2, 1], []) == pytest.approx(23 / 80)


def test_perfect_ranking_is_one_even_with_junk_interleaved():
    assert revisited_ap(np.arange(6), [0, 1, 2], []) == pytest.approx(1.0)
    assert revisited_ap(np.array([0, 4, 1, 5, 2, 3]), [0, 1, 2], [4, 5]) == pytest.approx(1.0)


def test_no_positive_is_nan_and_duplicates_count_once():
    assert math.isnan(revisited_ap(np.arange(4), [], [1]))
    assert revisited_ap(np.array([3, 1, 0, 2]), [1, 1, 1], []) == revisited_ap(np.array([3, 1, 0, 2]), [1], [])


def test_ap_from_scores_breaks_ties_by_lower_index():
    # items 0..3 tie; the only positive is 2, at rank 2 (after 0 and 1): AP = (0/2 + 1/3)/2 = 1/6
    assert revisited_ap_from_scores(np.zeros(4, dtype=np.float32), [2], []) == pytest.approx(1 / 6)


def test_precision_when_fewer_than_k_positives():
    # positives at adjusted 1-based ranks 1 and 2: kq = min(2, k), so P@5 = P@10 = 2/2 = 1
    assert precision_at_ks(np.array([0, 1]), [1, 5, 10]).tolist() == [1.0, 1.0, 1.0]
    # positives at 1-based 2 and 7: P@1 = 0/1, P@5 = 1/5, P@10: kq = 7 -> 2/7
    assert precision_at_ks(np.array([1, 6]), [1, 5, 10]) == pytest.approx([0.0, 0.2, 2 / 7])
    assert np.isnan(precision_at_ks(np.array([], dtype=np.int64), [1, 5])).all()


def test_setups_move_hard_and_easy_between_positives_and_junk():
    gt = _gt(easy=[4, 0], hard=[1], junk=[7])
    assert [p.tolist() for p in setup_judgements(gt, "easy")] == [[0, 4], [1, 7]]
    assert [p.tolist() for p in setup_judgements(gt, "medium")] == [[0, 1, 4], [7]]
    assert [p.tolist() for p in setup_judgements(gt, "hard")] == [[1], [0, 4, 7]]
    with pytest.raises(ValueError, match="unknown setup"):
        setup_judgements(gt, "extreme")


# --- the whole protocol on a worked example --------------------------------------------------------

# Query 0 ranks the database 3 0 7 1 9 4 2 8 5 6 (positions 0..9) with easy {0, 4}, hard {1, 5}, junk {7}.
#   Easy   positives {0, 4}, junk {7, 1, 5}: positions 1, 5 -> adjusted 1, 3 (two junk before item 4)
#          AP = [(0 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = (1/4 + 5/12) / 2 = 1/3
#          1-based 2, 4: P@1 = 0, P@5 = P@10 = 2/4 (kq = 4)
#   Medium positives {0, 1, 4, 5}, junk {7}: positions 1, 3, 5, 8 -> adjusted 1, 2, 4, 7
#          AP = [1/4 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2 + (3/7 + 4/8)/2] / 4 = (1/4 + 7/12 + 11/20 + 13/28) / 4 = 97/210
#          1-based 2, 3, 5, 8: P@1 = 0, P@5 = 3/5, P@10 = 4/8 (kq = 8)
#   Hard   positives {1, 5}, junk {7, 0, 4}: positions 3, 8 -> adjusted 1, 5
#          AP = [(0 + 1/2)/2 + (1/5 + 2/6)/2] / 2 = (1/4 + 4/15) / 2 = 31/120
#          1-based 2, 6: P@1 = 0, P@5 = 1/5, P@10 = 2/6 (kq = 6)
# Query 1 ranks 0 1 ... 9 with easy {2}, no hard, junk {3}: Easy and Medium both have the positive at
#   adjusted rank 2 (junk 3 comes after it): AP = (0/2 + 1/3)/2 = 1/6, P@1 = 0, P@5 = P@10 = 1/3 (kq = 3);
#   Hard has no positive: left out of the Hard means.
WORKED_SCORES = [_scores_for_ranking([3, 0, 7, 1, 9, 4, 2, 8, 5, 6]), _scores_for_ranking(list(range(10)))]
WORKED_GT = [_gt(easy=[0, 4], hard=[1, 5], junk=[7]), _gt(easy=[2], junk=[3])]
WORKED_EXPECTED = {
    "easy": {"mAP": (1 / 3 + 1 / 6) / 2, "mP@1": 0.0, "mP@5": (2 / 4 + 1 / 3) / 2, "mP@10": (2 / 4 + 1 / 3) / 2},
    "medium": {"mAP": (97 / 210 + 1 / 6) / 2, "mP@1": 0.0, "mP@5": (3 / 5 + 1 / 3) / 2, "mP@10": (4 / 8 + 1 / 3) / 2},
    "hard": {"mAP": 31 / 120, "mP@1": 0.0, "mP@5": 1 / 5, "mP@10": 2 / 6},
}


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_worked_example_all_setups(batch_size):
    queries, database = _embeddings_for(WORKED_SCORES)
    report = evaluate_revisited(queries, database, WORKED_GT, batch_size=batch_size)
    assert report.num_queries == 2 and report.num_database == 10
    assert report.counted == {"easy": 2, "medium": 2, "hard": 1}
    for setup, metrics in WORKED_EXPECTED.items():
        assert report.setups[setup] == pytest.approx(metrics), setup


def test_query_without_any_positive_is_counted_out():
    queries, database = _embeddings_for([_scores_for_ranking([0, 1, 2]), _scores_for_ranking([2, 1, 0])])
    report = evaluate_revisited(queries, database, [_gt(easy=[0]), _gt(junk=[1])])
    assert report.counted == {"easy": 1, "medium": 1, "hard": 0}
    assert report.setups["easy"]["mAP"] == 1.0 and report.setups["medium"]["mP@10"] == 1.0
    assert all(math.isnan(value) for value in report.setups["hard"].values())
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["setups"]["hard"]["mAP"] is None and payload["counted"]["hard"] == 0
    table = report.format_table(title="ROxford5k")
    assert table.splitlines()[0] == "ROxford5k" and "n/a" in table and "100.00" in table


def test_distractors_rank_after_the_database_and_can_push_positives_down():
    queries, database = _embeddings_for(WORKED_SCORES)
    below = np.full((5, 2), -1.0, dtype=np.float32)  # less similar than every database image
    report = evaluate_revisited(queries, database, WORKED_GT, distractors=below)
    assert report.num_database == 15
    assert report.setups["medium"] == pytest.approx(WORKED_EXPECTED["medium"])
    # one distractor above everything for both queries shifts every positive down by one rank
    above = np.full((1, 2), 2.0, dtype=np.float32)
    shifted = evaluate_revisited(queries, database, WORKED_GT, distractors=above)
    reference = evaluate_revisited(queries, np.concatenate([above, database]), _shift(WORKED_GT, 1))
    for setup in SETUPS:
        assert shifted.setups[setup] == pytest.approx(reference.setups[setup])
    assert shifted.setups["easy"]["mAP"] < report.setups["easy"]["mAP"]


def test_distractors_from_a_memory_map(tmp_path):
    queries, database = _embeddings_for(WORKED_SCORES)
    path = tmp_path / "distractors.npy"
    np.save(path, np.full((3, 2), 2.0, dtype=np.float32))
    mapped = np.load(path, mmap_mode="r")
    report = evaluate_revisited(queries, database, WORKED_GT, distractors=mapped)
    in_memory = evaluate_revisited(queries, database, WORKED_GT, distractors=np.asarray(mapped))
    assert report.setups == in_memory.setups


def _shift(ground_truth, offset):
    return [{key: value + offset for key, value in entry.items()} for entry in ground_truth]


# --- agreement with the official compute_map, written as a plain loop ------------------------------


def _official_compute_map(ranks: np.ndarray, gnd: list[dict], kappas: list[int]) -> tuple[float, np.ndarray]:
    """The official evaluation (revisitop compute_map), re-written from METHODS.md as loops."""
    total_ap, total_pr, counted = 0.0, np.zeros(len(kappas)), 0
    for i, entry in enumerate(gnd):
        ok, junk = set(entry["ok"].tolist()), set(entry["junk"].tolist())
        if not ok:
            continue
        counted += 1
        adjusted, junk_seen = [], 0
        for position, item in enumerate(ranks[:, i]):
            if item in ok:
                adjusted.append(position - junk_seen)
            if item in junk:  # counts for the positives after it
                junk_seen += 1
        ap = 0.0
        for j, r in enumerate(adjusted):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
        total_ap += ap
        pos = [r + 1 for r in adjusted]
        for n, k in enumerate(kappas):
            kq = min(max(pos), k)
            total_pr[n] += sum(1 for p in pos if p <= kq) / kq
    return total_ap / counted, total_pr / counted


def _official_setup(gnd: list[dict], setup: str) -> list[dict]:
    if setup == "easy":
        return [{"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])} for g in gnd]
    if setup == "medium":
        return [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    return [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]


def test_agrees_with_loop_reference_on_random_data_with_ties():
    rng = np.random.default_rng(7)
    num_queries, num_db, dim = 9, 60, 6
    # small integers: exact float32 inner products, and many exact ties
    queries = rng.integers(-2, 3, size=(num_queries, dim)).astype(np.float32)
    database = rng.integers(-2, 3, size=(num_db, dim)).astype(np.float32)
    gnd = []
    for q in range(num_queries):
        items = rng.permutation(num_db)
        sizes = rng.integers(0, 8, size=3)
        sizes[1] = 0 if q % 3 == 0 else sizes[1]  # some queries with no hard positive
        cuts = np.cumsum(sizes)
        gnd.append(_gt(items[: cuts[0]], items[cuts[0] : cuts[1]], items[cuts[1] : cuts[2]]))
    gnd.append(_gt())  # a query with no judgement at all
    queries = np.concatenate([queries, np.ones((1, dim), np.float32)])
    scores = queries.astype(np.float64) @ database.T.astype(np.float64)
    ranks = np.argsort(-scores, axis=1, kind="stable").T  # (db, queries), ties to the lower index
    report = evaluate_revisited(queries, database, gnd, batch_size=4)
    for setup in SETUPS:
        expected_map, expected_pr = _official_compute_map(ranks, _official_setup(gnd, setup), [1, 5, 10])
        got = report.setups[setup]
        assert got["mAP"] == pytest.approx(expected_map, abs=1e-12), setup
        assert [got["mP@1"], got["mP@5"], got["mP@10"]] == pytest.approx(expected_pr.tolist(), abs=1e-12), setup


# --- validation -----------------------------------------------------------------------------------


def test_rejects_mismatched_inputs():
    queries, database = _embeddings_for(WORKED_SCORES)
    with pytest.raises(ValueError, match="ground truth has 1 queries"):
        evaluate_revisited(queries, database, WORKED_GT[:1])
    with pytest.raises(ValueError, match="dimension"):
        evaluate_revisited(queries, database[:, :1], WORKED_GT)
    with pytest.raises(ValueError, match="distractors has 3"):
        evaluate_revisited(queries, database, WORKED_GT, distractors=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="outside"):
        evaluate_revisited(queries, database[:5], WORKED_GT)
    with pytest.raises(ValueError, match="shape"):
        evaluate_revisited(queries[0], database, WORKED_GT)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_revisited(queries, np.full_like(database, np.nan), WORKED_GT)
    with pytest.raises(ValueError, match="repeat"):
        evaluate_revisited(queries, database, WORKED_GT, ks=(1, 1))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_revisited(queries, database, WORKED_GT, batch_size=0)


def test_report_is_immutable_and_checks_columns():
    report = RevisitedReport(setups={"easy": {"mAP": 0.5}}, num_queries=1, counted={"easy": 1})
    with pytest.raises(AttributeError):
        report.num_queries = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="metrics"):
        RevisitedReport(setups={"easy": {"mAP": 0.5}, "hard": {"mP@1": 0.5}}, num_queries=1)
