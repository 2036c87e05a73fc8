"""Calibration diagnostics and plot: brute-force references, fabricated embeddings whose verdict is known, PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from indexing.calibration import Calibration, LevelThreshold, count_pairs, thresholds_from_counts
from indexing.calibration_diagnostics import (
    QUANTILES,
    CalibrationDiagnostics,
    DiagnosticLimits,
    diagnose,
    histogram_auc,
    histogram_quantiles,
)
from indexing.calibration_plot import (
    NEGATIVE_COLOUR,
    POSITIVE_COLOUR,
    THRESHOLD_COLOUR,
    plot_layout,
    render_calibration_plot,
    write_calibration_plot,
)
from indexing.manifest import Manifest

LEVELS = ("fine", "middle", "coarse")


def _banded(seed: int, per_fine: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Fine in middle in coarse clusters with cosine bands near 0.85 / 0.60 / 0.35 / 0 that never overlap.

    An item is ``a u_coarse + b u_middle + c u_fine + e n`` with orthonormal class directions and unit noise
    ``n`` orthogonal to them (a² = 0.35, b² = c² = 0.25, e² = 0.15): the bands are 0.25 apart and the noise
    moves a score by ``e² n·n'``, well under 0.125 in 50 noise dimensions.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    centres, noise_space = basis[:, :14].T, basis[:, 14:]
    a, b, c, e = np.sqrt([0.35, 0.25, 0.25, 0.15])
    vectors, labels = [], []
    for fine in range(8):
        for _ in range(per_fine):
            noise = noise_space @ rng.standard_normal(noise_space.shape[1])
            noise /= np.linalg.norm(noise)
            vectors.append(a * centres[fine // 4] + b * centres[2 + fine // 2] + c * centres[6 + fine] + e * noise)
            labels.append((fine, fine // 2, fine // 4))
    vectors = np.array(vectors)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), np.array(labels)


def _exact(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered ±1/8 vectors in 64-d: unit norm, every score an exact multiple of 1/32 (one score per bin of 64)."""
    rng = np.random.default_rng(seed)

    def flip(vector: np.ndarray, count: int) -> np.ndarray:
        out = vector.copy()
        out[rng.choice(64, size=count, replace=False)] *= -1
        return out

    vectors, labels = [], []
    for coarse in range(3):
        centre = rng.choice([-1.0, 1.0], size=64)
        for fine in range(3):
            middle = flip(centre, 10)
            for _ in range(4):
                vectors.append(flip(middle, 6))
                labels.append((3 * coarse + fine, 3 * coarse + fine, coarse))
    return (np.array(vectors) / 8.0).astype(np.float32), np.array(labels, dtype=np.int64)


def _squeezed(items: np.ndarray, weight: float = 3.0) -> np.ndarray:
    """Append one large shared component (a new dimension, orthogonal to the data) and renormalise.

    Every cosine becomes ``(s + w²) / (1 + w²)``: the ranking and the class separation are untouched, but all
    scores crowd into the top ``2 / (1 + w²)`` of [-1, 1]: the anisotropy that whitening removes.
    """
    out = np.concatenate([items, np.full((len(items), 1), weight, dtype=items.dtype)], axis=1)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _brute(items: np.ndarray, labels: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative leave-one-out pair scores of one level, from the full matrix."""
    scores = items @ items.T
    off = ~np.eye(len(items), dtype=bool)
    same = labels[:, level, None] == labels[None, :, level]
    return scores[same & off], scores[~same]


# --- the numbers, against brute force ----------------------------------------------------------------------


def test_quantiles_and_auc_match_brute_force_on_exact_scores():
    items, labels = _exact(11)
    counts = count_pairs(items, labels, bins=64)
    diagnostics = thresholds_from_counts(counts).diagnostics
    assert diagnostics is not None
    for k, summary in enumerate(diagnostics.levels):
        positive, negative = _brute(items, labels, k)
        for name, scores in (("positive_quantiles", positive), ("negative_quantiles", negative)):
            ordered = np.sort(scores)
            expected = tuple(float(ordered[max(-(-p * len(ordered) // 100), 1) - 1]) for p in QUANTILES)
            assert getattr(summary, name) == expected
        wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
        assert summary.auc == pytest.approx(wins / (len(positive) * len(negative)), abs=1e-12)
        assert summary.negatives == len(negative)
    all_scores = np.sort((items @ items.T)[~np.eye(len(items), dtype=bool)])
    assert diagnostics.band[0] == all_scores[-(-5 * len(all_scores) // 100) - 1]


def test_auc_and_quantiles_of_hand_made_histograms():
    edges = np.linspace(-1, 1, 8, endpoint=False)
    assert histogram_auc(np.array([0, 0, 0, 0, 0, 0, 2, 0]), np.array([3, 0, 0, 0, 0, 0, 0, 0])) == 1.0
    assert histogram_auc(np.array([1, 0, 0, 0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 0, 0, 0, 5])) == 0.0
    assert histogram_auc(np.array([0, 0, 1, 0, 0, 0, 0, 0]), np.array([0, 0, 1, 0, 0, 0, 0, 0])) == 0.5  # a tie
    assert histogram_auc(np.array([0, 1, 0, 0, 0, 0, 0, 0]), np.zeros(8)) is None
    # 20 scores: 1 in bin 0, 18 in bin 3, 1 in bin 7; the 5th percentile is the 1st smallest, the 95th the 19th
    hist = np.array([1, 0, 0, 18, 0, 0, 0, 1])
    assert histogram_quantiles(hist, edges) == (-1.0, -0.25, -0.25, -0.25, -0.25)
    assert histogram_quantiles(hist, edges, (100,)) == (0.75,)
    assert histogram_quantiles(np.zeros(8, np.int64), edges) is None


# --- verdicts on fabricated embeddings --------------------------------------------------------------------


def test_well_separated_classes_raise_no_warning():
    items, labels = _banded(seed=3)
    calibration = thresholds_from_counts(count_pairs(items, labels, schema=LEVELS))
    diagnostics = calibration.diagnostics
    assert diagnostics is not None and calibration.warnings == () and diagnostics.warnings == ()
    step = 2 / calibration.bins
    for k, summary in enumerate(diagnostics.levels):
        pairs = _brute(items, labels, k)
        for scores, quantiles in zip(pairs, (summary.positive_quantiles, summary.negative_quantiles), strict=True):
            ordered = np.sort(scores)
            exact = [ordered[max(-(-p * len(ordered) // 100), 1) - 1] for p in QUANTILES]
            assert all(edge <= value < edge + step for edge, value in zip(quantiles, exact, strict=True))
        assert summary.auc == 1.0
        assert summary.negative_quantiles[-1] < calibration.levels[k].threshold <= summary.positive_quantiles[0]
    assert diagnostics.band_width > DiagnosticLimits().min_band


def test_squeezed_scores_warn_and_suggest_whitening_while_ranking_is_intact():
    items, labels = _banded(seed=3)
    squeezed = _squeezed(items)
    calibration = thresholds_from_counts(count_pairs(squeezed, labels, schema=LEVELS))
    diagnostics = calibration.diagnostics
    assert diagnostics.kinds == {"squeezed"}, [w.message for w in diagnostics.warnings]
    (warning,) = diagnostics.warnings
    assert warning.levels == () and "--whiten" in warning.message and f"{diagnostics.band_width:.3f}" in warning.message
    assert diagnostics.band_width < 0.25 and diagnostics.band[0] > 0.7  # cosines (s + 9) / 10 >= 0.8 - noise
    assert all(summary.auc == 1.0 for summary in diagnostics.levels)  # the classes are still perfectly separated
    assert all(entry.f1 == 1.0 for entry in calibration.levels)


def test_overlapping_classes_warn_overlap_low_precision_and_low_f1():
    rng = np.random.default_rng(5)
    items = rng.standard_normal((240, 24)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    labels = np.stack([rng.integers(0, 24, 240), rng.integers(0, 8, 240), rng.integers(0, 3, 240)], axis=1)
    calibration = thresholds_from_counts(count_pairs(items, labels, schema=LEVELS))
    diagnostics = calibration.diagnostics
    assert {"overlap", "low_precision", "low_f1"} <= diagnostics.kinds
    assert "squeezed" not in diagnostics.kinds  # random 24-d vectors spread widely
    for summary in diagnostics.levels:
        assert abs(summary.auc - 0.5) < 0.05
    overlapping = {w.levels[0] for w in diagnostics.warnings if w.kind == "overlap"}
    assert overlapping == set(LEVELS)
    fine = calibration.level("fine")
    low_f1 = next(w for w in diagnostics.warnings if w.kind == "low_f1" and w.levels == ("fine",))
    assert f"{fine.f1:.3f}" in low_f1.message and f"{fine.threshold:.4f}" in low_f1.message
    kinds_in_order = [w.kind for w in diagnostics.warnings]
    assert kinds_in_order == sorted(kinds_in_order, key=["squeezed", "overlap", "crowded", "low_precision",
                                                          "low_f1"].index)  # fmt: skip


def test_a_level_that_adds_nothing_gives_crowded_thresholds():
    items, labels = _banded(seed=4)
    labels = labels.copy()
    labels[:, 1] = labels[:, 0]  # every middle class holds one fine class: the same pairs are positive
    calibration = thresholds_from_counts(count_pairs(items, labels, schema=LEVELS))
    assert calibration.level("fine").threshold == calibration.level("middle").threshold
    assert calibration.diagnostics.kinds == {"crowded"}
    (warning,) = calibration.warnings
    assert warning.levels == ("fine", "middle") and "0.0000 apart" in warning.message


def test_crowded_limit_is_the_larger_of_a_band_fraction_and_an_absolute_floor():
    items, labels = _banded(seed=3)
    counts = count_pairs(items, labels, schema=LEVELS)
    base = thresholds_from_counts(counts)
    width = base.diagnostics.band_width
    limit = max(0.05 * width, 0.01)
    assert limit == pytest.approx(0.05 * width)  # a wide band: the fraction decides

    def with_middle_at(gap: float) -> CalibrationDiagnostics:
        fine, middle, coarse = base.levels
        moved = LevelThreshold(**{**middle.to_dict(), "threshold": fine.threshold - gap})
        return diagnose(counts, (fine, moved, coarse))

    assert "crowded" in with_middle_at(0.9 * limit).kinds
    assert "crowded" not in with_middle_at(1.1 * limit).kinds
    strict = DiagnosticLimits(crowded_fraction=0.0, crowded_absolute=0.5)
    fine, middle, coarse = base.levels
    assert "crowded" in diagnose(counts, base.levels, strict).kinds  # 0.25 apart < 0.5
    with pytest.raises(ValueError, match="do not match the counted levels"):
        diagnose(counts, (middle, fine, coarse))


def test_low_precision_and_low_f1_follow_their_limits():
    items, labels = _banded(seed=3)
    counts = count_pairs(items, labels, schema=LEVELS)
    levels = thresholds_from_counts(counts).levels
    assert diagnose(counts, levels).warnings == ()
    demanding = DiagnosticLimits(min_f1=1.01 - 1e-9, min_precision=0.0)
    assert {w.kind for w in diagnose(counts, levels, demanding).warnings} == {"low_f1"}
    with pytest.raises(ValueError, match="min_f1"):
        DiagnosticLimits(min_f1=-0.1)


# --- storage ------------------------------------------------------------------------------------------------


def test_diagnostics_round_trip_through_json_and_the_manifest(tmp_path):
    rng = np.random.default_rng(2)
    items = rng.standard_normal((60, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    labels = np.stack([rng.integers(0, 6, 60), rng.integers(0, 2, 60)], axis=1)
    calibration = thresholds_from_counts(count_pairs(items, labels, schema=["fine", "coarse"], bins=1024))
    assert calibration.warnings  # random data: something to store
    payload = json.loads(json.dumps(calibration.to_dict()))
    assert Calibration.from_dict(payload) == calibration
    assert payload["diagnostics"]["warnings"][0] == calibration.warnings[0].to_dict()
    assert set(payload["diagnostics"]["levels"][0]["positive_quantiles"]) == {"p05", "p25", "p50", "p75", "p95"}

    manifest = Manifest(dim=16, count=60, encoder_id="e", levels=["fine", "coarse"], calibration=payload)
    manifest.write(tmp_path / "manifest.json")
    again = Manifest.read(tmp_path / "manifest.json")
    assert again == manifest and again.calibrated() == calibration

    legacy = {key: value for key, value in payload.items() if key != "diagnostics"}  # written before diagnostics
    old = Manifest(dim=16, count=60, encoder_id="e", levels=["fine", "coarse"], calibration=legacy).calibrated()
    assert old.diagnostics is None and old.warnings == () and old.thresholds == calibration.thresholds
    assert "AUC" not in old.format_table() and "AUC" in calibration.format_table()


def test_malformed_diagnostics_are_refused():
    items, labels = _banded(seed=3)
    payload = thresholds_from_counts(count_pairs(items, labels, schema=LEVELS, bins=1024)).to_dict()
    diagnostics = payload["diagnostics"]
    bad = [
        ({**diagnostics, "extra": 1}, "keys"),
        ({**diagnostics, "levels": diagnostics["levels"][::-1]}, "do not match the levels"),
        ({**diagnostics, "band": [0.1]}, "band"),
        ({**diagnostics, "warnings": [{"kind": "x", "levels": [], "message": ""}]}, "non-empty"),
        ({**diagnostics, "limits": {"min_auc": 0.9, "tolerance": 1}}, "limits"),
        (
            {**diagnostics, "levels": [{**diagnostics["levels"][0], "auc": 1.5}, *diagnostics["levels"][1:]]},
            "auc",
        ),
        (
            {
                **diagnostics,
                "levels": [
                    {**diagnostics["levels"][0], "positive_quantiles": {"p50": 0.1}},
                    *diagnostics["levels"][1:],
                ],
            },
            "quantiles",
        ),
    ]
    for broken, message in bad:
        with pytest.raises(ValueError, match=message):
            Calibration.from_dict({**payload, "diagnostics": broken})


# --- the plot -----------------------------------------------------------------------------------------------


def _colour_columns(image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> np.ndarray:
    """Per column of the plot area, how many pixels have exactly ``colour``."""
    pixels = np.asarray(image.convert("RGB"))[box[1] : box[3] + 1, box[0] : box[2] + 1]
    return np.all(pixels == np.array(colour, dtype=np.uint8), axis=2).sum(axis=0)


def test_plot_is_a_png_with_both_classes_and_the_threshold_in_every_panel(tmp_path):
    items, labels = _banded(seed=3)
    counts = count_pairs(items, labels, schema=LEVELS)
    calibration = thresholds_from_counts(counts)
    path = write_calibration_plot(tmp_path / "calibration.png", counts, calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.png"]  # no temporary file left behind
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        image = png.convert("RGB")
        assert png.format == "PNG"
    layout = plot_layout(len(LEVELS))
    assert image.size == layout.size and len(layout.panels) == 3
    line_positions = []
    for box in layout.panels:
        assert _colour_columns(image, box, POSITIVE_COLOUR).sum() > 50
        assert _colour_columns(image, box, NEGATIVE_COLOUR).sum() > 50
        threshold = _colour_columns(image, box, THRESHOLD_COLOUR)
        assert threshold.max() >= 0.8 * (box[3] - box[1])  # a vertical line through the plot area
        line_positions.append(int(np.argmax(threshold)))
    assert line_positions[0] > line_positions[1] > line_positions[2]  # fine is the strictest threshold
    # Between panels (titles, legends, tick labels) there is text; the header holds the objective.
    header = np.asarray(image)[: layout.panels[0][1] - 48]
    assert (header < 128).any()

    write_calibration_plot(path, counts, calibration)  # replacing an existing plot works the same way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.png"]


def test_plot_zooms_into_squeezed_scores():
    items, labels = _banded(seed=3)
    counts = count_pairs(_squeezed(items), labels, schema=LEVELS)
    image = render_calibration_plot(counts, thresholds_from_counts(counts))
    for box in plot_layout(3).panels:
        negative_columns = np.flatnonzero(_colour_columns(image, box, NEGATIVE_COLOUR))
        positive_columns = np.flatnonzero(_colour_columns(image, box, POSITIVE_COLOUR))
        # Scores in a 0.2-wide band still spread over the panel instead of collapsing into a few pixels.
        span = max(negative_columns.max(), positive_columns.max()) - min(negative_columns.min(), positive_columns.min())
        assert span > 0.8 * (box[2] - box[0])


def test_plot_refuses_counts_of_another_calibration():
    items, labels = _banded(seed=3)
    counts = count_pairs(items, labels, schema=LEVELS, bins=1024)
    other = thresholds_from_counts(count_pairs(items, labels[:, :2], schema=["fine", "middle"], bins=1024))
    with pytest.raises(ValueError, match="not those of the calibration"):
        render_calibration_plot(counts, other)
    with pytest.raises(ValueError, match="at least one level"):
        plot_layout(0)


def test_a_threshold_below_every_score_is_drawn_off_scale_without_flattening_the_histograms():
    items, labels = _banded(seed=3)
    counts = count_pairs(_squeezed(items), labels, schema=LEVELS)
    chosen = thresholds_from_counts(counts)
    # F1 can be best when every pair passes: the threshold then lies below all scores (here, far below).
    low = tuple(LevelThreshold(**{**e.to_dict(), "threshold": -0.5 - 0.1 * k}) for k, e in enumerate(chosen.levels))
    image = render_calibration_plot(counts, Calibration(low, bins=counts.bins))
    for box in plot_layout(3).panels:
        drawn = _colour_columns(image, box, NEGATIVE_COLOUR) + _colour_columns(image, box, POSITIVE_COLOUR)
        columns = np.flatnonzero(drawn)
        assert columns.max() - columns.min() > 0.8 * (box[2] - box[0])  # the x range is the scores' own
        threshold = _colour_columns(image, box, THRESHOLD_COLOUR)
        assert np.argmax(threshold) <= 3 and threshold.max() >= 0.4 * (box[3] - box[1])  # dashed, at the left edge


def test_a_level_where_every_pair_is_positive_has_no_auc_and_still_plots():
    items, labels = _banded(seed=3)
    labels = labels.copy()
    labels[:, 2] = 0  # one coarse class: every pair shares it, none is negative
    counts = count_pairs(items, labels, schema=LEVELS, bins=1024)
    calibration = thresholds_from_counts(counts)
    coarse = calibration.diagnostics.level("coarse")
    assert (coarse.negatives, coarse.auc, coarse.negative_quantiles) == (0, None, None)
    assert "overlap" not in calibration.diagnostics.kinds
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    assert "none" in calibration.format_table()
    image = render_calibration_plot(counts, calibration)
    coarse_box = plot_layout(3).panels[2]
    assert _colour_columns(image, coarse_box, POSITIVE_COLOUR).sum() > 50
    assert _colour_columns(image, coarse_box, NEGATIVE_COLOUR).sum() == 0
