"""``retrieval search --sheet``: the results of any search drawn as a contact sheet, through the real CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from isolated_python import run_isolated
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app
from serving.contact_sheet import BORDER, DIFFERENT, PAD, QUERY, level_colours

ROOT = Path(__file__).resolve().parents[2]
LEVELS = ["fine", "middle", "coarse"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
MIDDLE = {"red": "warm", "green": "cool", "blue": "cool"}
runner = CliRunner()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Nine seeded colour-patch PNGs with fine/middle/coarse labels (``labels.csv``)."""
    root = tmp_path_factory.mktemp("sheet_gallery")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(9):
        fine = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[fine]) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i}.png")
        rows.append({"path": f"img_{i}.png", "fine": fine, "middle": MIDDLE[fine], "coarse": "colour"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", *LEVELS])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def index_and_onnx(tiny_checkpoint, gallery, tmp_path_factory) -> tuple[Path, Path]:
    """An exact index of the gallery by the shared tiny checkpoint, calibrated on the gallery; its ONNX export."""
    from indexing.builder import build_index
    from indexing.calibrate_index import calibrate_index
    from retrieval.data.gallery import open_gallery
    from serving.export import export_onnx

    work = tmp_path_factory.mktemp("sheet_index")
    build_index(tiny_checkpoint, open_gallery(gallery), work / "index", batch_size=8, progress=False)
    calibrate_index(work / "index", gallery, batch_size=8, progress=False)
    return work / "index", export_onnx(tiny_checkpoint, work / "encoder.onnx", exporter="torchscript").path


def _queries(gallery: Path, *numbers: int) -> list[str]:
    return [str(gallery.parent / f"img_{i}.png") for i in numbers]


def _grid(sheet: Image.Image) -> tuple[list[int], list[list[tuple[int, ...]]]]:
    """Read the grid off the pixels: the top row of each query frame, and each row's hit frame colours.

    A query frame is a solid run of the QUERY colour down the sheet's first cell column; a row's hits are the
    frames met along its top frame edge, left to right, after the query's.
    """
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    column = (pixels[:, PAD + 1] == QUERY).all(axis=1)
    tops = [y for y in range(len(column)) if column[y] and (y == 0 or not column[y - 1])]
    rows = []
    for top in tops:
        line = pixels[top + BORDER // 2]
        frames, x = [], PAD
        while x < line.shape[0]:
            if (line[x] == (255, 255, 255)).all():
                x += 1
                continue
            colour, start = tuple(int(v) for v in line[x]), x
            while x < line.shape[0] and tuple(line[x]) == colour:
                x += 1
            if x - start > 2 * BORDER:  # a frame edge, not a stray pixel
                frames.append(colour)
        rows.append(frames[1:])  # the query's own frame first
    return tops, rows


def test_search_sheet_draws_every_query_and_hit_coloured_by_level(index_and_onnx, gallery, tmp_path):
    index, onnx = index_and_onnx
    out = tmp_path / "sheet.png"
    args = ["search", "--index", str(index), "--query-encoder", str(onnx), *_queries(gallery, 0, 4, 8)]
    result = runner.invoke(app, [*args, "--k", "4", "--sheet", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["sheet"] == str(out)
    sheet = Image.open(out)
    assert sheet.format == "PNG"
    sheet.load()  # a complete, decodable file

    tops, rows = _grid(sheet)
    assert len(tops) == 3 and [len(row) for row in rows] == [4, 4, 4]  # 3 queries x (query + 4 hits)
    colours = dict(zip(LEVELS, level_colours(3), strict=True))
    for row, item in zip(rows, payload["results"], strict=True):
        expected = [colours[hit["level"]] if hit.get("level") else DIFFERENT for hit in item["hits"]]
        assert row == expected  # no query labels: frames by each hit's calibrated level

    text = runner.invoke(app, [*args, "--k", "2", "--sheet", str(tmp_path / "two.png")])
    assert text.exit_code == 0, text.output
    assert f"contact sheet: {tmp_path / 'two.png'}" in text.stdout
    assert [len(row) for row in _grid(Image.open(tmp_path / "two.png"))[1]] == [2, 2, 2]


def test_search_sheet_with_query_labels_colours_by_agreement(index_and_onnx, gallery, tmp_path):
    index, onnx = index_and_onnx
    out = tmp_path / "agree.png"
    queries = _queries(gallery, 1, 2)
    args = ["search", "--index", str(index), "--query-encoder", str(onnx), *queries, "--k", "5", "--json"]
    result = runner.invoke(app, [*args, "--sheet", str(out), "--query-labels", str(gallery)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    labels = {row["path"]: row for row in csv.DictReader(gallery.open())}
    colours = level_colours(3)
    _, rows = _grid(Image.open(out))
    for row, item in zip(rows, payload["results"], strict=True):
        query = labels[Path(item["query"]).name]
        expected = []
        for hit in item["hits"]:
            shared = [i for i, level in enumerate(LEVELS) if hit["labels"][level] == query[level]]
            expected.append(colours[shared[0]] if shared else DIFFERENT)
        assert row == expected


def test_search_sheet_bad_inputs_are_one_line_errors(index_and_onnx, gallery, tmp_path):
    index, onnx = index_and_onnx
    base = ["search", "--index", str(index), "--query-encoder", str(onnx), *_queries(gallery, 0)]
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,fine\nimg_0.png,red\n")
    other_levels = tmp_path / "other.csv"
    other_levels.write_text("path,colour\nimg_0.png,red\n")
    cases = [
        ([*base, "--query-labels", str(gallery)], "give --sheet too"),
        ([*base, "--sheet", str(tmp_path / "s.png"), "--query-labels", str(no_path)], "'path' column"),
        ([*base, "--sheet", str(tmp_path / "s.png"), "--query-labels", str(other_levels)], "none of the index's"),
        ([*base, "--sheet", str(tmp_path / "s.png"), "--query-labels", str(tmp_path / "nope.csv")], "nope.csv"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "s.png").exists()


def test_search_sheet_with_onnx_never_imports_torch(index_and_onnx, gallery, tmp_path):
    index, onnx = index_and_onnx
    out = tmp_path / "torch_free.png"
    args = ["search", "--index", str(index), "--query-encoder", str(onnx), *_queries(gallery, 3), "--k", "3"]
    done = run_isolated(["-X", "importtime", "-m", "retrieval.cli.main", *args, "--sheet", str(out), "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["sheet"] == str(out) and Image.open(out).format == "PNG"
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, flags=re.MULTILINE)
    assert "serving.contact_sheet" in imported and "onnxruntime" in imported  # the log is read correctly
    heavy = sorted({name for name in imported if name.split(".")[0] in ("torch", "torchvision", "timm")})
    assert heavy == [], f"search --sheet with ONNX imported {heavy[:5]}"


def test_hits_below_every_threshold_carry_a_null_level_and_a_dash(index_and_onnx, gallery, tmp_path) -> None:
    import shutil

    from indexing.manifest import Manifest

    source, onnx = index_and_onnx
    index = tmp_path / "index"
    shutil.copytree(source, index)
    manifest = Manifest.read(index / "manifest.json")  # thresholds only the query itself (score 1) reaches
    strict = {"fine": 0.99999, "middle": 0.99998, "coarse": 0.99997}
    manifest.model_copy(update={"calibration": None, "thresholds": strict}).write(index / "manifest.json")
    args = ["search", "--index", str(index), "--query-encoder", str(onnx), "--k", "4", *_queries(gallery, 0)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"][0]["hits"]
    assert [hit["level"] for hit in hits] == ["fine", None, None, None]  # "level": null, not a missing key
    assert runner.invoke(app, args).stdout.count("level=-") == 3
