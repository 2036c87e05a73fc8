"""``retrieval index build|merge|add --whiten``: the options, the summaries and the one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """12 PNGs of 3 classes (4 each) and their labels.csv, plus an unlabelled list of the same files."""
    root = tmp_path_factory.mktemp("cli_whiten")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        colour = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)][i % 3])
        pixels = np.clip(colour + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"p{i:02d}.png")
        rows.append({"path": f"p{i:02d}.png", "fine": f"c{i % 3}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "list.txt").write_text("\n".join(row["path"] for row in rows) + "\n")
    return root / "labels.csv"


def test_build_with_whiten_reports_it_and_add_whitens(tiny_checkpoint, labelled, tmp_path):
    out = tmp_path / "index"
    common = ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(labelled), "--out", str(out)]
    built = _json([*common, "--whiten", "learned", "--whiten-dim", "6"])
    whitening = built["whitening"]
    assert (whitening["method"], whitening["dim_in"], whitening["dim_out"]) == ("learned", 32, 6)
    assert whitening["count"] == 12 and whitening["pairs"] == 3 * 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dim"] == 6 and manifest["whitening"]["method"] == "learned"
    printed = runner.invoke(app, [*common, "--whiten", "pca"])
    assert printed.exit_code == 0, printed.output
    assert "whitened (pca): 32 -> 11 dims, fitted on gallery" in " ".join(printed.output.split())
    added = _json(["index", "add", str(out), "--images", str(labelled.parent / "list.txt")])
    assert added["whitening"] == "pca" and added["count"] == 24
    verified = _json(["index", "verify", str(out)])
    assert verified["whitening"] == "verified"
    unwhitened = _json([*common])
    assert unwhitened["whitening"] is None
    assert "whitening" not in json.loads((out / "manifest.json").read_text())  # readable by older releases
    assert not (out / "whitening.safetensors").exists()


def test_merge_fits_the_whitening_and_shards_refuse_it(tiny_checkpoint, labelled, tmp_path):
    common = ["--encoder", str(tiny_checkpoint), "--images", str(labelled), "--chunk-size", "4"]
    line = _error(["index", "build", *common, "--shard", "0/2", "--whiten", "pca", "--out", str(tmp_path / "s0")])
    assert "pass it to `retrieval index merge`" in line
    shards = []
    for i in range(2):
        _json(["index", "build", *common, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")])
        shards.append(str(tmp_path / f"s{i}"))
    merged = _json(["index", "merge", *shards, "--out", str(tmp_path / "merged"), "--whiten", "pca"])
    assert merged["whitening"]["dim_out"] == 11 and merged["whitening"]["fitted_on"].startswith("gallery ")


def test_bad_whitening_options_are_one_error_line(tiny_checkpoint, labelled, tmp_path):
    build = ["index", "build", "--encoder", str(tiny_checkpoint), "--out", str(tmp_path / "x")]
    gallery = ["--images", str(labelled)]
    assert "valid names: learned, pca" in _error([*build, *gallery, "--whiten", "zca"])
    unlabelled = ["--images", str(labelled.parent / "list.txt")]
    assert "carries no labels" in _error([*build, *unlabelled, "--whiten", "learned"])
    assert "only apply with --whiten" in _error([*build, *gallery, "--whiten-dim", "4"])
    assert "larger than the 11 directions" in _error([*build, *gallery, "--whiten", "pca", "--whiten-dim", "20"])
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_build_help_explains_when_to_whiten():
    result = runner.invoke(app, ["index", "build", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps help inside a box
    assert "--whiten" in text and "scores crowd together" in text and "--whiten-images" in text
