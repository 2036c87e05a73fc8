"""Real JPEGs: index and evaluate the clothing-small photos through the CLI (skipped where absent)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from retrieval.cli.main import app

pytestmark = pytest.mark.clothing


def test_index_and_evaluate_real_photos(clothing_small, tiny_checkpoint, tmp_path):
    runner = CliRunner()
    labels = clothing_small / "labels.csv"
    expected = sum(1 for _ in labels.open()) - 1

    built = runner.invoke(
        app,
        ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(labels), "--out", str(tmp_path / "idx"),
         "--json"],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    summary = json.loads(built.stdout)
    assert summary["count"] + summary["skipped"] == expected and summary["count"] > 0.95 * expected

    evaluated = runner.invoke(app, ["evaluate", "recall", "--encoder", str(tiny_checkpoint), "--images", str(labels),
                                    "--json"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert list(report["per_level"]) == ["fine", "coarse"]  # the two label columns of this CSV, finest first
    for values in report["per_level"].values():
        assert 0.0 < values["mAP"] <= 1.0
