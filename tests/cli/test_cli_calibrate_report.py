"""`retrieval index calibrate` says how far its thresholds can be trusted: warnings, score percentiles, a plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from indexing.calibration_diagnostics import WARNING_KINDS
from indexing.calibration_plot import plot_layout
from indexing.manifest import Manifest
from retrieval.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
SMALL = ["--image-size", "32", "--set", "train_per_class=2", "--set", "val_per_class=1", "--set", "test_per_class=2"]


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_checkpoint) -> tuple[Path, Path, dict]:
    """An index of the synthetic test split, calibrated (``--json``) on the train split by a random tiny encoder."""
    root = tmp_path_factory.mktemp("calibrate_report")
    _json(["data", "synth", "--out", str(root / "synth"), *SMALL])
    index, labels = root / "index", root / "synth" / "train" / "labels.csv"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(root / "synth" / "test"),
           "--out", str(index)])  # fmt: skip
    return index, labels, _json(["index", "calibrate", str(index), "--labels", str(labels)])


def test_calibrate_json_carries_the_warnings_and_the_plot(calibrated):
    index, _, payload = calibrated
    warnings = payload["warnings"]
    assert warnings == payload["calibration"]["diagnostics"]["warnings"]
    assert warnings, "a random, untrained encoder cannot give trustworthy thresholds"
    assert {w["kind"] for w in warnings} <= set(WARNING_KINDS)
    assert all(set(w) == {"kind", "levels", "message"} and w["message"] for w in warnings)
    levels = payload["calibration"]["diagnostics"]["levels"]
    assert [entry["level"] for entry in levels] == ["fine", "middle", "coarse"]
    assert all(0.0 <= entry["auc"] <= 1.0 for entry in levels)

    stored = Manifest.read(index / "manifest.json").calibrated()
    assert [w.to_dict() for w in stored.warnings] == warnings  # what was printed is what the manifest keeps

    assert payload["plot"] == str(index / "calibration.png")
    with Image.open(payload["plot"]) as png:
        png.verify()
    with Image.open(payload["plot"]) as png:
        assert png.format == "PNG" and png.size == plot_layout(3).size
    assert not [p.name for p in index.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    verified = _json(["index", "verify", str(index)])  # the extra file does not trouble verification
    assert verified["count"] > 0
    info = _json(["index", "info", str(index)])
    assert info["calibration_plot"] == payload["plot"]
    assert info["calibration"]["diagnostics"]["warnings"] == warnings


def test_calibrate_prints_the_warnings_after_the_table(calibrated):
    index, labels, payload = calibrated
    result = runner.invoke(app, ["index", "calibrate", str(index), "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    warning_lines = [n for n, line in enumerate(lines) if line.startswith("warning: ")]
    assert len(warning_lines) == len(payload["warnings"])
    assert [lines[n].removeprefix("warning: ") for n in warning_lines] == [w["message"] for w in payload["warnings"]]
    table_end = max(n for n, line in enumerate(lines) if line.startswith(("score band", "plot:")))
    assert min(warning_lines) > table_end  # after the table, the last thing a person reads
    assert any("AUC" in line for line in lines) and any(line.startswith("score percentiles") for line in lines)
    assert f"plot: {index / 'calibration.png'}" in lines


def test_info_shows_stored_warnings_and_reads_a_calibration_from_before_diagnostics(calibrated, tmp_path):
    index, _, payload = calibrated
    shown = runner.invoke(app, ["index", "info", str(index)])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert [line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")] == [
        w["message"] for w in payload["warnings"]
    ]
    count = len(payload["warnings"])
    assert any(line.startswith("thresholds") and f"({count} calibration warning" in line for line in lines)
    assert any(line.startswith("plot") and "calibration.png" in line for line in lines)

    older = tmp_path / "older"
    shutil.copytree(index, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["calibration"]["diagnostics"]  # as written before diagnostics existed
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "calibration.png").unlink()
    old = runner.invoke(app, ["index", "info", str(older)])
    assert old.exit_code == 0, old.output
    assert "warning:" not in old.stdout and "calibration warning" not in old.stdout and "plot " not in old.stdout
    info = _json(["index", "info", str(older)])
    assert info["thresholds"] == payload["thresholds"] and info["calibration_plot"] is None


@pytest.mark.clothing
def test_real_photos_with_an_untrained_encoder_are_flagged(clothing_small, tiny_checkpoint, tmp_path):
    """The reported case: real photos, an encoder that has not learnt them, every score squeezed near 1."""
    rows = (clothing_small / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    path_col, split_col = header.index("path"), header.index("split")
    validation = tmp_path / "validation.csv"
    kept = [r.split(",") for r in rows[1:] if r.split(",")[split_col] == "validation"]
    validation.write_text(
        "\n".join([rows[0], *(",".join([str(clothing_small / r[path_col]), *r[path_col + 1 :]]) for r in kept)]) + "\n"
    )
    index = tmp_path / "index"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(validation), "--out", str(index)])
    payload = _json(["index", "calibrate", str(index), "--labels", str(validation)])
    kinds = {(w["kind"], tuple(w["levels"])) for w in payload["warnings"]}
    assert {("overlap", ("fine",)), ("overlap", ("coarse",)), ("squeezed", ())} <= kinds
    diagnostics = payload["calibration"]["diagnostics"]
    assert diagnostics["band"][1] - diagnostics["band"][0] < 0.25 and diagnostics["band"][0] > 0.5
    assert all(abs(level["auc"] - 0.5) < 0.15 for level in diagnostics["levels"])


def test_calibrating_for_a_students_queries_pairs_them_with_the_index_encoders_vectors(
    calibrated, tiny_checkpoint, make_student, make_checkpoint, tmp_path, caplog
):
    from indexing.calibration import count_pairs, thresholds_from_counts
    from indexing.extract import extract_embeddings
    from models import load_encoder, read_checkpoint_info
    from retrieval.data.datasets import open_dataset

    source, labels, teacher_payload = calibrated
    index = tmp_path / "index"
    shutil.copytree(source, index)
    student = make_student(tiny_checkpoint, seed=5)
    payload = _json(["index", "calibrate", str(index), "--labels", str(labels), "--query-encoder", str(student)])
    calibration = payload["calibration"]
    assert calibration["query_encoder_id"] == read_checkpoint_info(student).encoder_id
    assert Manifest.read(index / "manifest.json").calibrated().query_encoder_id == calibration["query_encoder_id"]

    levels = Manifest.read(index / "manifest.json").levels
    dataset = open_dataset(labels, levels=levels)
    teacher = extract_embeddings(load_encoder(tiny_checkpoint), dataset, progress=False).embeddings
    queries = extract_embeddings(load_encoder(student), dataset, progress=False).embeddings
    expected = thresholds_from_counts(  # student queries against the teacher's vectors of every other image
        count_pairs(
            queries, dataset.labels, teacher, dataset.labels, schema=levels, query_in_gallery=range(len(dataset))
        )
    )
    assert payload["thresholds"] == pytest.approx(expected.thresholds, abs=1e-3)
    assert payload["thresholds"] != pytest.approx(teacher_payload["thresholds"], abs=1e-3)

    from serving.engine import SearchEngine

    with caplog.at_level("WARNING", logger="serving.engine"):
        with SearchEngine.open(index, student) as engine:  # the student the thresholds were fitted for: no warning
            assert engine.describe()["thresholds_fitted_for"] == calibration["query_encoder_id"]
        assert not caplog.records
        with SearchEngine.open(source, student) as engine:  # thresholds of the teacher's own queries
            assert engine.describe()["thresholds_fitted_for"] == read_checkpoint_info(tiny_checkpoint).encoder_id
        assert "--query-encoder" in caplog.text and calibration["query_encoder_id"] in caplog.text

    stranger = make_checkpoint(9)  # neither the index's encoder nor distilled into its space
    result = runner.invoke(
        app, ["index", "calibrate", str(index), "--labels", str(labels), "--query-encoder", str(stranger)]
    )
    assert result.exit_code == 2 and "not distilled into its space" in result.output
