"""EvaluationReport: immutability, mean over levels, JSON export and the text table."""

import dataclasses
import json
import math

import pytest

from retrieval.evaluation import EvaluationReport

PER_LEVEL = {
    "fine": {"R@1": 0.5, "R@5": 0.75, "mAP": 0.25},
    "coarse": {"R@1": 1.0, "R@5": 1.0, "mAP": 0.875},
}


def test_from_levels_computes_unweighted_mean():
    report = EvaluationReport.from_levels(PER_LEVEL, num_queries=8, counted={"fine": 6, "coarse": 8})
    assert report.mean == pytest.approx({"R@1": 0.75, "R@5": 0.875, "mAP": 0.5625})
    assert report.levels == ["fine", "coarse"]
    assert report.metric_names == ["R@1", "R@5", "mAP"]


def test_report_is_frozen_and_owns_its_dicts():
    source = {level: dict(metrics) for level, metrics in PER_LEVEL.items()}
    report = EvaluationReport.from_levels(source, num_queries=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.num_queries = 3  # type: ignore[misc]
    source["fine"]["R@1"] = 0.0
    assert report.per_level["fine"]["R@1"] == 0.5


def test_to_dict_is_json_ready_with_nan_as_null():
    per_level = {**PER_LEVEL, "middle": {"R@1": math.nan, "R@5": math.nan, "mAP": math.nan}}
    report = EvaluationReport.from_levels(per_level, num_queries=8, counted={"middle": 0})
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["per_level"]["middle"] == {"R@1": None, "R@5": None, "mAP": None}
    assert data["mean"]["R@1"] == pytest.approx(0.75)  # NaN level skipped in the mean
    assert data["num_queries"] == 8
    assert data["counted"] == {"middle": 0}


def test_format_table_layout():
    report = EvaluationReport.from_levels(PER_LEVEL, num_queries=8, counted={"fine": 6, "coarse": 8})
    lines = report.format_table().splitlines()
    assert "%" in lines[0] and "8 queries" in lines[0]
    assert lines[1].split() == ["level", "R@1", "R@5", "mAP", "queries"]
    assert lines[3].split() == ["fine", "50.00", "75.00", "25.00", "6"]
    assert lines[4].split() == ["coarse", "100.00", "100.00", "87.50", "8"]
    assert lines[-1].split() == ["mean", "75.00", "87.50", "56.25", "8"]
    # Columns are right-aligned: every number of a column ends at the same offset.
    ends = {line.index("25.00") + 5 for line in lines if "25.00" in line}
    assert ends == {lines[1].index("mAP") + 3}
    assert len({len(line) for line in lines[1:] if not line.startswith("-")}) == 1


def test_inconsistent_metric_names_are_rejected():
    with pytest.raises(ValueError, match="level 'coarse'"):
        EvaluationReport(
            per_level={"fine": {"R@1": 0.5, "mAP": 0.1}, "coarse": {"R@1": 0.5}},
            mean={"R@1": 0.5, "mAP": 0.1},
            num_queries=2,
        )
