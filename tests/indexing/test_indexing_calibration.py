"""Granularity thresholds: calibration against full-matrix references and hand-worked cases, then filtering."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from indexing.calibration import (
    Calibration,
    LevelThreshold,
    calibrate_thresholds,
    count_pairs,
    parse_objective,
    thresholds_from_counts,
)
from indexing.granularity import filter_by_granularity, finest_level, level_thresholds, tag_hits
from indexing.results import SearchHit, SearchResults

LEVELS = ("fine", "middle", "coarse")


def _sign_vectors(seed: int, per_fine: int = 4, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Clustered ±1/8 vectors in 64-d: exactly unit norm, and every dot product is exact in float32 (a multiple of
    1/32), so any summation order and any chunking give bit-identical scores, many of them exactly on grid edges."""
    rng = np.random.default_rng(seed)

    def flip(vector: np.ndarray, count: int) -> np.ndarray:
        out = vector.copy()
        out[rng.choice(dim, size=count, replace=False)] *= -1
        return out

    vectors, labels = [], []
    for c in range(3):
        coarse = rng.choice([-1.0, 1.0], size=dim)
        for m in range(2):
            middle = flip(coarse, 12)
            for f in range(2):
                fine = flip(middle, 6)
                for _ in range(per_fine):
                    vectors.append(flip(fine, 3))
                    labels.append((4 * c + 2 * m + f, 2 * c + m, c))
    return (np.array(vectors) / 8.0).astype(np.float32), np.array(labels, dtype=np.int64)


def _banded(seed: int = 0, per_fine: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Fine clusters in middle clusters in coarse clusters with known cosine bands.

    An item is ``a u_coarse + b u_middle + c u_fine + e n`` with orthonormal class directions and a unit noise
    direction ``n`` orthogonal to them, a² = 0.35, b² = c² = 0.25, e² = 0.15. Pairs then score about
    0.85 (same fine), 0.60 (same middle only), 0.35 (same coarse only) and 0 (different coarse class), each
    plus ``e² n·n'`` (|n·n'| well below 0.5 in 50 noise dimensions), so the bands never overlap.
    """
    rng = np.random.default_rng(seed)
    dim, num_centres = 64, 2 + 4 + 8
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    centres, noise_space = basis[:, :num_centres].T, basis[:, num_centres:]
    a, b, c, e = np.sqrt([0.35, 0.25, 0.25, 0.15])
    vectors, labels = [], []
    for fine in range(8):
        middle, coarse = fine // 2, fine // 4
        for _ in range(per_fine):
            noise = noise_space @ rng.standard_normal(noise_space.shape[1])
            noise /= np.linalg.norm(noise)
            vectors.append(a * centres[coarse] + b * centres[2 + middle] + c * centres[6 + fine] + e * noise)
            labels.append((fine, middle, coarse))
    vectors = np.array(vectors)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), np.array(labels)


def _naive_counts(queries, q_labels, gallery, g_labels, edges, exclude=None):
    """Reference: the full score matrix and, per candidate threshold, pairs with ``score >= t`` (all, per level)."""
    scores = queries @ gallery.T
    valid = np.ones(scores.shape, dtype=bool) if exclude is None else ~exclude
    predicted = np.array([int(((scores >= t) & valid).sum()) for t in edges])
    true_positives = np.array(
        [
            [int(((scores >= t) & valid & (q_labels[:, k, None] == g_labels[None, :, k])).sum()) for t in edges]
            for k in range(q_labels.shape[1])
        ]
    )
    return predicted, true_positives


# --- counting --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [64, 256])
def test_counts_match_the_full_matrix_reference_including_scores_on_edges(bins):
    gallery, g_labels = _sign_vectors(0)
    queries, q_labels = gallery[::5], g_labels[::5]
    counts = count_pairs(queries, q_labels, gallery, g_labels, LEVELS, bins=bins, batch_size=3)
    predicted, true_positives = counts.at_or_above()
    ref_predicted, ref_true_positives = _naive_counts(queries, q_labels, gallery, g_labels, counts.edges)
    on_edges = np.isin(queries @ gallery.T, counts.edges).mean()
    assert on_edges > 0.9  # the test really exercises "score == threshold counts as passing"
    np.testing.assert_array_equal(predicted, ref_predicted)
    np.testing.assert_array_equal(true_positives, ref_true_positives)
    assert counts.levels == LEVELS and counts.bins == bins


def test_chunking_does_not_change_counts_or_thresholds():
    gallery, g_labels = _sign_vectors(1)
    queries, q_labels = _sign_vectors(2)
    results = [count_pairs(queries, q_labels, gallery, g_labels, bins=1024, batch_size=size) for size in (1, 7, None)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.total, results[0].total)
        np.testing.assert_array_equal(other.positives, results[0].positives)
    calibrations = {repr(thresholds_from_counts(counts).to_dict()) for counts in results}
    assert len(calibrations) == 1


def test_leave_one_out_excludes_self_pairs():
    items, labels = _sign_vectors(3)
    n = len(items)
    loo = count_pairs(items, labels, bins=64)
    assert int(loo.total.sum()) == n * (n - 1)
    for k in range(labels.shape[1]):
        sizes = np.unique(labels[:, k], return_counts=True)[1]
        assert int(loo.positives[k].sum()) == int((sizes * (sizes - 1)).sum())
    explicit = count_pairs(items, labels, items, labels, bins=64, query_in_gallery=np.arange(n))
    np.testing.assert_array_equal(explicit.total, loo.total)
    np.testing.assert_array_equal(explicit.positives, loo.positives)
    with_self = count_pairs(items, labels, items, labels, bins=64)
    extra = with_self.total - loo.total  # self-pairs score exactly 1.0: all land in the top bin
    assert int(extra[-1]) == n and int(extra[:-1].sum()) == 0
    ref_predicted, _ = _naive_counts(items, labels, items, labels, loo.edges, exclude=np.eye(n, dtype=bool))
    np.testing.assert_array_equal(loo.at_or_above()[0], ref_predicted)


def test_query_in_gallery_excludes_only_the_named_pairs():
    items, labels = _sign_vectors(4)
    queries, q_labels = items[:5], labels[:5]
    position = np.array([0, 1, -1, 3, -1])
    counts = count_pairs(queries, q_labels, items, labels, bins=64, query_in_gallery=position)
    assert int(counts.total.sum()) == 5 * len(items) - 3


# --- choosing thresholds -----------------------------------------------------------------------------------


def _tiny_case():
    """One query (1, 0) and five gallery items: class A at scores 1.0, 0.8, -0.6; class B at 0.6, 0.0."""
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]], dtype=np.float32)
    return query, np.array([0]), gallery, np.array([0, 0, 1, 1, 0])


def test_tiny_case_f1_by_hand():
    # Thresholds in (0.6, 0.8] keep 1.0 and 0.8: TP 2, FP 0, P 3 -> precision 1, recall 2/3, F1 0.8.
    # Elsewhere: (0.8, 1] F1 0.5; (0, 0.6] 2/3; (-0.6, 0] 4/7; at or below -0.6 0.75. The F1 plateau is the
    # gap (0.6, 0.8], and the threshold is taken in its middle.
    calibration = calibrate_thresholds(*_tiny_case(), schema=["fine"], bins=4096)
    (entry,) = calibration.levels
    assert 0.6 < entry.threshold <= 0.8 and abs(entry.threshold - 0.7) <= 2 / 4096
    assert entry.precision == 1.0 and entry.recall == pytest.approx(2 / 3) and entry.f1 == pytest.approx(0.8)
    assert (entry.positives, entry.pairs, entry.clamped) == (3, 5, False)
    assert calibration.thresholds == {"fine": entry.threshold}


def test_tiny_case_precision_targets_by_hand():
    edges = (np.arange(4096) - 2048) / 2048
    above_06 = float(edges[edges > np.float32(0.6)][0])
    # Every pair kept: precision 3/5 >= 0.5, so the lowest candidate (-1) with recall 1.
    low = calibrate_thresholds(*_tiny_case(), schema=["fine"], bins=4096, objective="precision>=0.5").levels[0]
    assert (low.threshold, low.precision, low.recall) == (-1.0, pytest.approx(0.6), 1.0)
    # Precision 0.7 is first reached just above the class-B item at 0.6 (precision 1 there).
    high = calibrate_thresholds(*_tiny_case(), schema=["fine"], bins=4096, objective="precision >= 0.7").levels[0]
    assert high.threshold == above_06 and high.precision == 1.0 and high.recall == pytest.approx(2 / 3)
    # Precision 1 is reached at the same place (and again above 0.8, with less recall).
    top = calibrate_thresholds(*_tiny_case(), schema=["fine"], bins=4096, objective="precision>=1").levels[0]
    assert top.threshold == above_06


def test_thresholds_fall_between_the_known_similarity_bands():
    items, labels = _banded()
    calibration = calibrate_thresholds(items, labels, schema=LEVELS)
    scores = items @ items.T
    off_diagonal = ~np.eye(len(items), dtype=bool)
    ideal_gap_centres = {"fine": (0.85 + 0.60) / 2, "middle": (0.60 + 0.35) / 2, "coarse": (0.35 + 0.0) / 2}
    for k, entry in enumerate(calibration.levels):
        same = labels[:, k, None] == labels[None, :, k]
        lowest_positive = scores[same & off_diagonal].min()
        highest_negative = scores[~same].max()
        assert highest_negative < lowest_positive  # the bands really are separated
        assert highest_negative < entry.threshold <= lowest_positive
        assert abs(entry.threshold - (highest_negative + lowest_positive) / 2) <= 2 / calibration.bins
        assert abs(entry.threshold - ideal_gap_centres[entry.level]) < 0.07
        assert (entry.precision, entry.recall, entry.f1, entry.clamped) == (1.0, 1.0, 1.0, False)
        # The reported counts are those of the comparison search uses: score >= threshold.
        kept = (scores >= entry.threshold) & off_diagonal
        assert int((kept & same).sum()) == round(entry.recall * entry.positives)
        assert int((kept & same).sum()) == round(entry.precision * kept.sum())
    assert calibration.level_names == list(LEVELS)
    assert (
        calibration.level("fine").threshold
        > calibration.level("middle").threshold
        > calibration.level("coarse").threshold
    )


def test_precision_target_is_the_lowest_threshold_reaching_it_against_brute_force():
    items, labels = _sign_vectors(5)
    counts = count_pairs(items, labels, bins=64)
    predicted, true_positives = _naive_counts(
        items, labels, items, labels, counts.edges, np.eye(len(items), dtype=bool)
    )
    calibration = thresholds_from_counts(counts, "precision>=0.6")
    for k, entry in enumerate(calibration.levels):
        precision = np.where(predicted > 0, true_positives[k] / np.maximum(predicted, 1), 0.0)
        lowest = int(np.flatnonzero((precision >= 0.6) & (true_positives[k] > 0))[0])
        assert entry.raw_threshold == counts.edges[lowest]
        assert entry.precision >= 0.6 or entry.clamped
    assert calibration.objective == "precision>=0.6"


def _violating_case():
    """One query; its only fine match scores 0.1, its middle-only matches 0.9 and 0.85, the rest 0.5, 0.4, 0.3.

    On its own, fine's best F1 (2/7) is at a threshold <= 0.1 while middle's (0.8) is in (0.5, 0.85]: the raw
    optima put middle above fine. Jointly, both <= 0.1 gives 2/7 + 2/3 > 0 + 0.8.
    """
    scores = np.array([0.1, 0.9, 0.85, 0.5, 0.4, 0.3])
    gallery = np.stack([scores, np.sqrt(1 - scores**2)], axis=1).astype(np.float32)
    gallery_labels = np.array([[0, 0], [1, 0], [2, 0], [3, 1], [4, 1], [5, 1]])
    return np.array([[1.0, 0.0]], dtype=np.float32), np.array([[0, 0]]), gallery, gallery_labels


def test_ruler_order_is_enforced_with_the_best_ordered_thresholds():
    query, q_labels, gallery, g_labels = _violating_case()
    calibration = calibrate_thresholds(query, q_labels, gallery, g_labels, schema=["fine", "middle"], bins=64)
    fine, middle = calibration.levels
    assert fine.raw_threshold < middle.raw_threshold  # the raw optima did break the order
    assert fine.threshold >= middle.threshold and calibration.clamped and middle.clamped
    assert (fine.f1, middle.f1) == (pytest.approx(2 / 7), pytest.approx(2 / 3))
    assert (fine.precision, middle.precision) == (pytest.approx(1 / 6), pytest.approx(1 / 2))
    # Brute force over every ordered pair of candidates.
    edges = (np.arange(64) - 32) / 32
    predicted, tp = _naive_counts(query, q_labels, gallery, g_labels, edges)
    f1 = 2 * tp / (predicted[None, :] + tp[:, :1])
    best = max(f1[0, i] + f1[1, j] for i, j in itertools.product(range(64), repeat=2) if i >= j)
    assert fine.f1 + middle.f1 == pytest.approx(best)
    table = calibration.format_table()
    assert "*" in table and "ruler order" in table and f"{middle.raw_threshold:.4f}" in table


def test_ordered_raw_optima_are_kept_as_they_are():
    calibration = calibrate_thresholds(*_banded(seed=1), bins=1024)
    assert not calibration.clamped
    assert all(entry.threshold == entry.raw_threshold for entry in calibration.levels)


# --- value type ---------------------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip_through_json():
    calibration = calibrate_thresholds(*_violating_case(), schema=["fine", "middle"], bins=64)
    payload = json.loads(json.dumps(calibration.to_dict()))
    assert Calibration.from_dict(payload) == calibration
    assert payload["levels"][1]["clamped"] is True and payload["objective"] == "f1" and payload["bins"] == 64


def test_from_dict_and_constructor_reject_invalid_calibrations():
    entry = LevelThreshold("fine", 0.5, 1.0, 1.0, 1.0, positives=1, pairs=2, raw_threshold=0.5)
    coarse = LevelThreshold("coarse", 0.7, 1.0, 1.0, 1.0, positives=1, pairs=2, raw_threshold=0.7)
    with pytest.raises(ValueError, match="ruler order"):
        Calibration((entry, coarse))
    with pytest.raises(ValueError, match="unique"):
        Calibration((entry, entry))
    with pytest.raises(ValueError, match="unknown calibration keys"):
        Calibration.from_dict({"levels": [], "extra": 1})
    with pytest.raises(ValueError, match="level 0"):
        Calibration.from_dict({"levels": [{"level": "fine", "threshold": 0.5}]})
    with pytest.raises(ValueError, match=r"threshold must be a number in \[-1, 1\]"):
        LevelThreshold("fine", 1.5, 1.0, 1.0, 1.0, positives=1, pairs=2, raw_threshold=0.5)
    with pytest.raises(ValueError, match="positives <= pairs"):
        LevelThreshold("fine", 0.5, 1.0, 1.0, 1.0, positives=3, pairs=2, raw_threshold=0.5)


def test_invalid_inputs_are_reported():
    query, q_labels, gallery, g_labels = _tiny_case()
    with pytest.raises(ValueError, match="unknown objective"):
        calibrate_thresholds(query, q_labels, gallery, g_labels, objective="recall")
    with pytest.raises(ValueError, match="unknown objective"):
        parse_objective("precision>=1.5")
    assert parse_objective("F1") is None and parse_objective(" precision >= 0.95 ") == 0.95
    with pytest.raises(ValueError, match="power of two"):
        count_pairs(query, q_labels, gallery, g_labels, bins=1000)
    with pytest.raises(ValueError, match="no calibration pair shares a fine class"):
        calibrate_thresholds(query, q_labels, gallery, np.full(5, 7))
    with pytest.raises(ValueError, match="dimension"):
        count_pairs(query, q_labels, np.ones((5, 3), np.float32), g_labels)
    with pytest.raises(ValueError, match="integer"):
        count_pairs(query, np.array([0.5]), gallery, g_labels)
    with pytest.raises(ValueError, match="NaN"):
        count_pairs(np.array([[np.nan, 0.0]]), q_labels, gallery, g_labels)
    with pytest.raises(ValueError, match="batch_size"):
        count_pairs(query, q_labels, gallery, g_labels, batch_size=0)
    with pytest.raises(ValueError, match="never reaches precision"):
        calibrate_thresholds(query, q_labels, gallery, np.array([1, 0, 1, 1, 0]), objective="precision>=0.9")


# --- granularity -------------------------------------------------------------------------------------------

THRESHOLDS = {"fine": 0.8, "middle": 0.5, "coarse": 0.2}


def _hits() -> SearchResults:
    scores = [0.95, 0.8, 0.7, 0.5, 0.3, 0.1]
    return SearchResults(tuple(SearchHit(id=10 + i, score=s, path=f"{i}.jpg") for i, s in enumerate(scores)))


def test_filter_by_granularity_keeps_the_hits_at_or_above_the_level_threshold():
    results = _hits()
    assert filter_by_granularity(results, THRESHOLDS, "fine").ids == [10, 11]
    assert filter_by_granularity(results, THRESHOLDS, "middle").ids == [10, 11, 12, 13]
    assert filter_by_granularity(results, THRESHOLDS, "middle", k=2).ids == [10, 11]
    assert filter_by_granularity(results, THRESHOLDS, "coarse", k=10).ids == [10, 11, 12, 13, 14]
    assert len(filter_by_granularity(SearchResults(), THRESHOLDS, "fine")) == 0
    with pytest.raises(ValueError, match="unknown granularity 'tiny'; calibrated levels are fine, middle, coarse"):
        filter_by_granularity(results, THRESHOLDS, "tiny")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        filter_by_granularity(results, THRESHOLDS, "fine", k=0)


def test_finest_level_and_tags():
    assert finest_level(0.8, THRESHOLDS) == "fine"  # a score equal to the threshold passes
    assert finest_level(0.79, THRESHOLDS) == "middle"
    assert finest_level(0.2, THRESHOLDS) == "coarse"
    assert finest_level(0.1, THRESHOLDS) is None
    tagged = tag_hits(_hits(), THRESHOLDS)
    assert [t.level for t in tagged] == ["fine", "fine", "middle", "middle", "coarse", None]
    assert tagged.ids == _hits().ids and tagged.scores == _hits().scores
    assert tagged[2] == SearchHit(id=12, score=0.7, path="2.jpg", level="middle")
    assert tagged[2].to_dict() == {"id": 12, "score": 0.7, "path": "2.jpg", "labels": {}, "level": "middle"}
    assert "level" not in tagged[5].to_dict()  # below every threshold: no level
    with pytest.raises(ValueError, match="finite"):
        finest_level(float("nan"), THRESHOLDS)


def test_granularity_accepts_a_calibration_and_rejects_disordered_thresholds():
    calibration = calibrate_thresholds(*_banded(), bins=1024)
    assert level_thresholds(calibration) == list(calibration.thresholds.items())
    fine = calibration.level("fine").threshold
    assert finest_level(fine, calibration) == "fine"
    assert finest_level(np.nextafter(fine, -1.0), calibration) == "middle"
    with pytest.raises(ValueError, match="ruler order"):
        level_thresholds({"coarse": 0.2, "fine": 0.8})
    with pytest.raises(ValueError, match="non-empty"):
        level_thresholds({})


def test_joint_ordered_choice_matches_brute_force():
    from indexing.calibration import _best_ordered

    rng = np.random.default_rng(7)
    for _ in range(20):
        values = rng.integers(0, 5, size=(3, 9)).astype(np.float64)
        values[rng.random(values.shape) < 0.2] = -np.inf  # infeasible candidates (precision targets)
        reference = max(
            (
                values[0, i] + values[1, j] + values[2, k]
                for i, j, k in itertools.product(range(9), repeat=3)
                if i >= j >= k
            ),
        )
        if not np.isfinite(reference):
            with pytest.raises(ValueError, match="ruler order"):
                _best_ordered(values, LEVELS, 0.9)
            continue
        for target in (None, 0.9):
            chosen = _best_ordered(values, LEVELS, target)
            assert chosen[0] >= chosen[1] >= chosen[2]
            assert values[[0, 1, 2], chosen].sum() == reference


def test_a_hit_below_every_threshold_carries_no_level_through_index_directory_search(tmp_path):
    from indexing.faiss_index import FaissIndex
    from indexing.index_dir import open_index_dir, write_index_dir
    from indexing.manifest import Manifest
    from indexing.metadata import MetadataRow
    from serving.api.schemas import Hit

    # Gallery items at known cosines to the query e0: 0.95 (fine), 0.7 (coarse), 0.2 and -0.3 (below both).
    cosines = np.array([0.95, 0.7, 0.2, -0.3])
    gallery = np.stack([cosines, np.sqrt(1 - cosines**2), np.zeros(4)], axis=1).astype(np.float32)
    index = FaissIndex(3)
    index.add(gallery, np.arange(4))
    rows = [MetadataRow(id=i, path=f"{i}.jpg", labels={"fine": f"f{i}", "coarse": "c"}) for i in range(4)]
    entries = tuple(
        LevelThreshold(name, threshold, 1.0, 1.0, 1.0, positives=1, pairs=4, raw_threshold=threshold)
        for name, threshold in (("fine", 0.9), ("coarse", 0.5))
    )
    calibration = Calibration(entries).to_dict()
    manifest = Manifest(dim=3, count=4, encoder_id="e", levels=["fine", "coarse"], calibration=calibration)
    write_index_dir(tmp_path / "idx", index, rows, manifest)
    query = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    with open_index_dir(tmp_path / "idx") as directory:
        (found,) = directory.search(query, 4)
        (coarse_only,) = directory.search(query, 4, granularity="coarse")
    assert found.ids == [0, 1, 2, 3]
    assert [hit.level for hit in found] == ["fine", "coarse", None, None]  # not the finest level: none at all
    assert coarse_only.ids == [0, 1]
    assert "level" not in found[2].to_dict() and found[1].to_dict()["level"] == "coarse"
    assert Hit.from_hit(found[2]).model_dump()["level"] is None  # the HTTP API answers "level": null
