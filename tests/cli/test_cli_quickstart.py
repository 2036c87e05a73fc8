"""End to end: a shortened quickstart through the real CLI, then the artifacts it leaves behind."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from indexing.manifest import Manifest
from retrieval.cli import quickstart_cmd
from retrieval.cli.main import app

# A few training steps on small images: enough to exercise every stage, fast enough for the default suite.
SHORT = [
    "--set", "schedule.max_steps=30",
    "--set", "eval_every=30",
    "--set", "checkpoint_every=30",
    "--set", "data.synthetic.image_size=32",
    "--set", "model.preprocess.input_size=32",
    "--set", "data.synthetic.train_per_class=6",
    "--set", "data.synthetic.val_per_class=2",
    "--set", "data.synthetic.test_per_class=4",
    "--student-set", "schedule.max_steps=10",
    "--student-set", "model.preprocess.input_size=32",
]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, one_torch_thread):
    work = tmp_path_factory.mktemp("quickstart")
    result = CliRunner().invoke(app, ["quickstart", "--work-dir", str(work), "--json", *SHORT])
    assert result.exit_code == 0, result.output
    return work, json.loads(result.stdout)


def test_quickstart_reports_every_level_and_beats_chance(quickstart_run):
    _, report = quickstart_run
    levels = report["metrics"]["per_level"]
    assert list(levels) == ["fine", "middle", "coarse"]
    for values in levels.values():
        assert 0.0 <= values["R@1"] <= 1.0 and 0.0 <= values["mAP"] <= 1.0
    # Even 30 steps at 32 px must rank coarse neighbours far above random vectors.
    assert report["metrics"]["mean"]["mAP"] > report["chance"]["mean"]["mAP"] + 0.05
    assert report["training"]["steps"] == 30 and report["training"]["stopped"] == "completed"
    assert report["training"]["max_minutes"] is None  # no minute cap by default: the work is budgeted in steps
    assert report["training"]["onnx_min_cosine"] >= 0.9999


def test_quickstart_distils_a_student_into_the_teachers_space(quickstart_run):
    _, report = quickstart_run
    student, teacher_id = report["student"], report["training"]["encoder_id"]
    assert student["steps"] == 10 and student["onnx_min_cosine"] >= 0.9999
    assert student["max_minutes"] is None and student["stopped"] == "completed"
    assert set(student["evaluation"]) == {"symmetric", "asymmetric"}
    assert list(student["evaluation"]["asymmetric"]["per_level"]) == ["fine", "middle", "coarse"]
    assert student["latency"]["student_ms"] > 0 and student["latency"]["teacher_ms"] > 0
    from serving.onnx_metadata import read_onnx_metadata

    metadata = read_onnx_metadata(report["paths"]["query_encoder"])
    assert metadata.teacher_id == teacher_id and metadata.encoder_id != teacher_id
    mobile = student["mobile"]  # the phone's int8 model of the same student, checked against its float32 export
    assert mobile["encoder_id"] == metadata.encoder_id and mobile["ort_path"] == report["paths"]["mobile_query_encoder"]
    assert mobile["mean_cosine"] >= 0.98 and mobile["top_k_overlap"] >= 0.8 and mobile["size_ratio"] < 0.5


def test_quickstart_leaves_usable_artifacts(quickstart_run):
    work, report = quickstart_run
    paths = report["paths"]
    for key in ("encoder", "index", "query_encoder", "contact_sheet", "test_csv"):
        assert (work / paths[key]).exists(), key
    assert len(report["samples"]) == 4 and all(len(s["hits"]) == 5 for s in report["samples"])
    for sample in report["samples"]:
        assert sample["query"] not in [hit["path"] for hit in sample["hits"]]  # the query itself is left out

    runner = CliRunner()
    info = runner.invoke(app, ["index", "info", paths["index"], "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["count"] > 0

    query = report["samples"][0]["query"]
    for encoder in ("gallery_encoder_onnx", "query_encoder", "mobile_query_encoder"):  # teacher, student, phone
        args = ["search", "--index", paths["index"], "--query-encoder", paths[encoder], query, "--k", "3", "--json"]
        searched = runner.invoke(app, args)
        assert searched.exit_code == 0, searched.output
        hits = json.loads(searched.stdout)["results"][0]["hits"]
        assert len(hits) == 3
    teacher_args = ["search", "--index", paths["index"], "--query-encoder", paths["gallery_encoder_onnx"], query]
    searched = runner.invoke(app, [*teacher_args, "--k", "1", "--json"])
    assert json.loads(searched.stdout)["results"][0]["hits"][0]["path"] == query  # a gallery image finds itself


def test_search_reports_a_corrupt_query_without_a_traceback(quickstart_run, tmp_path):
    _, report = quickstart_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    result = CliRunner().invoke(app, ["search", "--index", report["paths"]["index"], str(bad)])
    assert result.exit_code == 2
    assert "cannot read image" in result.output and str(bad) in result.output
    assert "Traceback" not in result.output


def test_quickstart_calibrates_its_index_for_granularity_searches(quickstart_run):
    _, report = quickstart_run
    calibration, paths = report["calibration"], report["paths"]
    thresholds = calibration["thresholds"]
    assert list(thresholds) == ["fine", "middle", "coarse"]
    assert list(thresholds.values()) == sorted(thresholds.values(), reverse=True)  # ruler order
    with open(paths["val_csv"]) as fh:  # the labelled validation split, written as files beside the gallery
        assert calibration["images"] == sum(1 for _ in fh) - 1 > 0
    assert isinstance(calibration["warnings"], list)
    # the server queries with the student, so the stored thresholds are fitted to the student's queries
    from serving.onnx_metadata import read_onnx_metadata

    assert calibration["queries_by"] == "student"
    stored = Manifest.read(Path(paths["index"]) / "manifest.json").calibrated()
    assert stored.query_encoder_id == read_onnx_metadata(paths["query_encoder"]).encoder_id
    assert report["student"]["teacher_calibration"]["queries_by"] == "index encoder"

    runner = CliRunner()
    info = runner.invoke(app, ["index", "info", paths["index"], "--json"])
    assert json.loads(info.stdout)["thresholds"] == thresholds  # stored in the manifest the server reads
    query = report["samples"][0]["query"]
    assert all("level" in hit for sample in report["samples"] for hit in sample["hits"][:1])
    for encoder in ("gallery_encoder_onnx", "query_encoder"):
        args = ["search", "--index", paths["index"], "--query-encoder", paths[encoder], query, "--json"]
        everything = json.loads(runner.invoke(app, [*args, "--k", "200"]).stdout)["results"][0]["hits"]
        for level in ("fine", "middle", "coarse"):
            searched = runner.invoke(app, [*args, "--k", "5", "--granularity", level])
            assert searched.exit_code == 0, searched.output
            hits = json.loads(searched.stdout)["results"][0]["hits"]
            expected = [h["id"] for h in everything if h["score"] >= thresholds[level]][:5]
            assert [h["id"] for h in hits] == expected
            assert all(h["score"] >= thresholds[level] and h["level"] is not None for h in hits)


def _summary(report: dict, monkeypatch, width: int = 40) -> str:
    """The text summary as a narrow terminal (or a pipe) would get it."""
    out = io.StringIO()
    monkeypatch.setattr(quickstart_cmd, "console", Console(file=out, width=width, soft_wrap=True))
    quickstart_cmd._print_summary(report)
    return out.getvalue()


def test_quickstart_summary_commands_paste_as_they_are(quickstart_run, monkeypatch):
    _, report = quickstart_run
    text = _summary(report, monkeypatch)
    paths = report["paths"]
    serve = f"retrieval serve --index {paths['index']} --query-encoder {paths['query_encoder']}"
    assert f"  {serve}\n" in text  # one line, however narrow the terminal
    search = [line for line in text.splitlines() if line.startswith("  retrieval search ")]
    assert len(search) == 1 and "--granularity middle --sheet" in search[0]
    assert search[0].endswith(report["samples"][0]["query"])
    assert f"python examples/query_client.py --model {paths['mobile_query_encoder']} PHOTO.png" in text
    assert "granularity thresholds" in text and f"{report['calibration']['thresholds']['fine']:.3f}" in text
    assert "partial run" not in text.lower()


def test_quickstart_summary_says_plainly_when_a_cap_cut_training_short(quickstart_run, monkeypatch):
    _, report = quickstart_run
    capped = copy.deepcopy(report)
    # stopped at the cap, or a schedule fitted to the cap that completed: both are fewer steps than planned
    capped["training"].update(stopped="time_budget", steps=12, planned_steps=30, max_minutes=0.5)
    capped["student"].update(stopped="completed", steps=4, planned_steps=10, max_minutes=0.25)
    text = _summary(capped, monkeypatch, width=200)
    assert "trained 12 of 30 steps" in text and "PARTIAL RUN, 12 of 30 steps" in text
    assert "student: 4 of 10 steps" in text
    final = text[text.index("partial run:") :]  # at the end of the summary, where it is read
    assert "gallery encoder trained 12 of 30 steps within its --minutes cap of 0.5 min" in final
    assert "student query encoder trained 4 of 10 steps within its --student-minutes cap of 0.25 min" in final
