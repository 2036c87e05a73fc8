"""The stage commands chained through the CLI: synth -> index build -> info -> evaluate -> export -> search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrieval.cli.main import app

runner = CliRunner()
SMALL = ["--image-size", "32", "--set", "train_per_class=2", "--set", "val_per_class=1", "--set", "test_per_class=3"]


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # --json output must be parseable: no progress bars on stdout


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    written = _json(["data", "synth", "--out", str(out), *SMALL])
    assert set(written) == {"train", "val", "test"}
    return out


def test_index_evaluate_export_search_chain(synth_dir, tiny_checkpoint, tmp_path):
    test_csv = synth_dir / "test" / "labels.csv"
    (synth_dir / "test" / "broken.png").write_bytes(b"not a png")
    with test_csv.open("a") as fh:
        fh.write("broken.png,triangle-red-solid,triangle,polygon\n")
    rows = sum(1 for _ in test_csv.open()) - 1

    built = _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(test_csv),
                   "--out", str(tmp_path / "index")])  # fmt: skip
    assert built["count"] == rows - 1 and built["skipped"] == 1
    assert "broken.png" in (tmp_path / "index" / "skipped.tsv").read_text()

    info = _json(["index", "info", str(tmp_path / "index")])
    assert info["count"] == rows - 1 and info["levels"] == ["fine", "middle", "coarse"]

    report = _json(["evaluate", "recall", "--encoder", str(tiny_checkpoint), "--images", str(test_csv),
                    "--ks", "1,2"])  # fmt: skip
    assert report["skipped"] == 1 and set(report["per_level"]["coarse"]) == {"R@1", "R@2", "mAP"}
    chance = report["chance"]  # random unit vectors with the same labels: what the numbers mean
    assert set(chance["per_level"]["coarse"]) == {"R@1", "R@2", "mAP"} and 0 < chance["mean"]["mAP"] < 1

    exported = _json(["export", "--encoder", str(tiny_checkpoint), "--out", str(tmp_path / "q.onnx")])
    assert exported["min_cosine_vs_pytorch"] >= 0.9999

    query = next((synth_dir / "test").glob("*/0000.png"))
    found = _json(["search", "--index", str(tmp_path / "index"), "--query-encoder", str(tmp_path / "q.onnx"),
                   str(query), "--k", "2"])  # fmt: skip
    assert found["results"][0]["hits"][0]["path"] == str(query.resolve())

    # one unreadable query among good ones: the others are answered, the failure is listed, the exit status is 1
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    search = ["search", "--index", str(tmp_path / "index"), "--query-encoder", str(tmp_path / "q.onnx"), "--json"]
    partial = runner.invoke(app, [*search, str(query), str(broken)])
    assert partial.exit_code == 1 and len(json.loads(partial.stdout)["results"]) == 1
    assert json.loads(partial.stdout)["errors"][0]["query"] == str(broken)
    assert runner.invoke(app, [*search, str(broken)]).exit_code == 2


def test_bad_inputs_are_one_line_errors(synth_dir, tiny_checkpoint, tmp_path):
    cases = [
        (["index", "info", str(tmp_path)], "manifest"),
        (["search", "--index", str(tmp_path / "nope"), str(tmp_path / "q.png")], "nope"),
        (["export", "--encoder", str(tmp_path), "--out", str(tmp_path / "x.onnx")], "not an encoder checkpoint"),
        (["train", "--config", "no-such-recipe"], "no-such-recipe"),
        (["train", "--set", "optim.lrr=1"], "optim.lrr"),
        (["evaluate", "recall", "--encoder", str(tiny_checkpoint), "--images", str(synth_dir), "--ks", "5,5"], "--ks"),
    ]
    build = ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(synth_dir / "test")]
    cases.append(([*build, "--out", str(tmp_path / "i"), "--memory-budget", "lots"], "invalid size 'lots'"))
    cases.append(([*build, "--out", str(tmp_path / "i"), "--target-recall", "1.5"], "target recall"))
    if not torch.cuda.is_available():
        cases.append(([*build, "--out", str(tmp_path / "i"), "--device", "cuda:7"], "cuda:7"))
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)


def test_serve_reports_invalid_environment_settings(tmp_path):
    result = runner.invoke(app, ["serve", "--index", str(tmp_path)], env={"RETRIEVAL_MAX_K": "0"})
    assert result.exit_code == 2 and "invalid server settings" in result.output and "max_k" in result.output


def test_calibrate_then_search_at_a_granularity(synth_dir, tiny_checkpoint, tmp_path):
    index = tmp_path / "index"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(synth_dir / "test"),
           "--out", str(index)])  # fmt: skip
    query = next((synth_dir / "test").glob("*/0000.png"))
    uncalibrated = runner.invoke(app, ["search", "--index", str(index), str(query), "--granularity", "fine"])
    assert uncalibrated.exit_code == 2 and "retrieval index calibrate" in uncalibrated.output
    index_file = (index / "index.faiss").read_bytes()

    calibrated = _json(["index", "calibrate", str(index), "--labels", str(synth_dir / "train" / "labels.csv")])
    thresholds = calibrated["thresholds"]
    assert list(thresholds) == ["fine", "middle", "coarse"]
    assert list(thresholds.values()) == sorted(thresholds.values(), reverse=True)  # ruler order
    for entry in calibrated["calibration"]["levels"]:
        assert set(entry) >= {"threshold", "precision", "recall", "f1"} and entry["pairs"] > 0
    assert (index / "index.faiss").read_bytes() == index_file  # only the manifest changed
    info = _json(["index", "info", str(index)])
    assert info["thresholds"] == thresholds and info["calibration"] == calibrated["calibration"]

    table = runner.invoke(app, ["index", "calibrate", str(index), "--labels", str(synth_dir / "train" / "labels.csv"),
                                "--objective", "precision>=0.5"])  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "precision" in table.output and "recall" in table.output and "middle" in table.output

    thresholds = _json(["index", "info", str(index)])["thresholds"]
    everything = _json(["search", "--index", str(index), str(query), "--k", "100"])["results"][0]["hits"]
    assert everything[0]["level"] == "fine"
    for level, threshold in thresholds.items():
        found = _json(["search", "--index", str(index), str(query), "--k", "3", "--granularity", level])
        hits = found["results"][0]["hits"]
        assert [h["id"] for h in hits] == [h["id"] for h in everything if h["score"] >= threshold][:3]
        assert all(h["score"] >= threshold and h["level"] is not None for h in hits)

    unknown = runner.invoke(app, ["search", "--index", str(index), str(query), "--granularity", "tiny"])
    assert unknown.exit_code == 2 and "unknown granularity 'tiny'" in unknown.output


def test_calibrate_refuses_labels_without_the_index_levels(synth_dir, tiny_checkpoint, tmp_path):
    index = tmp_path / "index"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(synth_dir / "val"),
           "--out", str(index)])  # fmt: skip
    labels = tmp_path / "fine_only.csv"
    rows = (synth_dir / "train" / "labels.csv").read_text().splitlines()
    labels.write_text("\n".join(",".join(row.split(",")[:2]) for row in rows) + "\n")
    cases = [
        (["--labels", str(labels)], "missing label column(s) 'middle', 'coarse'"),
        (["--labels", str(synth_dir / "train" / "labels.csv"), "--objective", "recall"], "unknown objective"),
        (["--labels", str(tmp_path / "nope.csv")], "nope.csv"),
    ]
    for extra, expected in cases:
        result = runner.invoke(app, ["index", "calibrate", str(index), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert expected in result.output and "Traceback" not in result.output, (extra, result.output)
    assert _json(["index", "info", str(index)])["calibration"] is None


def test_build_with_calibrate_stores_thresholds_in_one_step(synth_dir, tiny_checkpoint, tmp_path):
    index, labels = tmp_path / "index", synth_dir / "train" / "labels.csv"
    common = ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(synth_dir / "val")]
    refused = runner.invoke(app, [*common, "--out", str(index), "--calibrate", str(labels), "--objective", "recall"])
    assert refused.exit_code == 2 and "unknown objective" in refused.output and not index.exists()

    built = _json([*common, "--out", str(index), "--calibrate", str(labels)])
    assert list(built["thresholds"]) == ["fine", "middle", "coarse"]
    separate = tmp_path / "separate"
    _json([*common, "--out", str(separate)])
    calibrated = _json(["index", "calibrate", str(separate), "--labels", str(labels)])
    assert built["thresholds"] == calibrated["thresholds"]  # the same as calibrating afterwards
    assert _json(["index", "info", str(index)])["thresholds"] == built["thresholds"]
