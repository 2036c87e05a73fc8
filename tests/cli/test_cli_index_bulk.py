"""``retrieval index build --shard / merge / add / info`` through the CLI, on a gallery given as a path list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _run(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return result.output


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def path_list(tmp_path_factory) -> Path:
    """A text file listing 30 PNGs (relative paths, a comment, a blank line) and one missing file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    lines = ["# holiday photos", ""]
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"p{i:02d}.png")
        lines.append(f"p{i:02d}.png")
    lines.insert(10, "gone.png")  # listed but not on disk: skipped and reported
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def test_shards_merged_by_the_cli_equal_a_single_build(tiny_checkpoint, path_list, tmp_path):
    common = ["--encoder", str(tiny_checkpoint), "--images", str(path_list), "--chunk-size", "4", "--batch-size", "2"]
    single = _json(["index", "build", *common, "--out", str(tmp_path / "single")])
    assert single["images"] == 31 and single["count"] == 30 and single["skipped"] == 1
    assert single["chunks_resumed"] == 0 and single["factory"] == "Flat"

    shards = []
    for i in range(3):
        shard = _json(["index", "build", *common, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}")])
        assert shard["shard"] == f"{i}/3" and shard["chunks_written"] in (2, 3)
        shards.append(str(tmp_path / f"s{i}"))
    merged = _json(["index", "merge", *shards, "--out", str(tmp_path / "merged")])
    assert merged["count"] == 30 and merged["skipped"] == 1
    single_bytes = (tmp_path / "single" / "index.faiss").read_bytes()
    assert (tmp_path / "merged" / "index.faiss").read_bytes() == single_bytes

    output = _run(["index", "merge", *shards[:2], "--out", str(tmp_path / "partial")], code=2)
    assert "error:" in output and "uncovered" in output
    output = _run(["index", "build", *common, "--shard", "3/3", "--out", str(tmp_path / "bad")], code=2)
    assert "below N" in output


def test_add_then_info_describes_the_grown_index(tiny_checkpoint, path_list, tmp_path):
    index = tmp_path / "index"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(path_list), "--out", str(index)])
    added = _json(["index", "add", str(index), "--images", str(path_list)])
    assert added == {**added, "added": 30, "skipped": 1, "first_id": 31, "count": 60}

    info = _json(["index", "info", str(index)])
    assert info["count"] == 60 and info["skipped"] == 2 and info["id_range"] == [0, 61]
    assert [entry["action"] for entry in info["history"]] == ["build", "add"]
    assert info["faiss"]["default_params"] == {} and info["levels"] == []

    text = _run(["index", "info", str(index)])
    assert "60 indexed, 2 skipped as unreadable" in text and "0 .. 61" in text
    assert "none (unlabelled)" in text and "not calibrated" in text
    assert text.count("history") == 2 and "add: 30 of 31 images" in text

    output = _run(["index", "add", str(tmp_path / "nowhere"), "--images", str(path_list)], code=2)
    assert "index directory not found" in output


def test_search_with_min_score_returns_everything_above_it(tiny_checkpoint, path_list, tmp_path):
    index = tmp_path / "index"
    _json(["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(path_list), "--out", str(index)])
    query = str(path_list.parent / "p03.png")
    everything = _json(["search", "--index", str(index), query, "--k", "30"])["results"][0]["hits"]
    threshold = (everything[4]["score"] + everything[5]["score"]) / 2  # between the 5th and 6th best
    above = _json(["search", "--index", str(index), query, "--min-score", f"{threshold:.6f}"])["results"][0]["hits"]
    assert [h["id"] for h in above] == [h["id"] for h in everything[:5]]
    capped = _json(["search", "--index", str(index), query, "--min-score", f"{threshold:.6f}", "--k", "2"])
    assert [h["id"] for h in capped["results"][0]["hits"]] == [h["id"] for h in everything[:2]]
    both = _run(["search", "--index", str(index), query, "--min-score", "0.5", "--granularity", "fine"], code=2)
    assert "give one" in both


def _stored_vectors(index: Path) -> np.ndarray:
    """The vectors of an index, in id order (what the extraction produced)."""
    from indexing.index_dir import open_index_dir

    with open_index_dir(index) as directory:
        ids, vectors = directory.index.reconstruct_all()
    return vectors[np.argsort(ids)]


def test_build_and_add_through_onnx_runtime_match_torch(tiny_checkpoint, path_list, tmp_path):
    common = ["--encoder", str(tiny_checkpoint), "--images", str(path_list), "--batch-size", "8"]
    torch_built = _json(["index", "build", *common, "--out", str(tmp_path / "torch"), "--runtime", "torch"])
    onnx_built = _json(
        ["index", "build", *common, "--out", str(tmp_path / "onnx"), "--runtime", "onnx", "--threads", "1"]
    )
    assert torch_built["runtime"] == "torch" and onnx_built["runtime"] == "onnx"
    assert "ONNX Runtime" in onnx_built["runtime_reason"]
    assert onnx_built["count"] == torch_built["count"] == 30 and onnx_built["skipped"] == 1
    torch_vectors, onnx_vectors = _stored_vectors(tmp_path / "torch"), _stored_vectors(tmp_path / "onnx")
    assert (torch_vectors * onnx_vectors).sum(axis=1).min() >= 0.9999
    assert not (tmp_path / "onnx.extract").exists()  # chunks and the cached export go with the work directory

    added = _json(["index", "add", str(tmp_path / "onnx"), "--images", str(path_list), "--runtime", "onnx"])
    assert added["runtime"] == "onnx" and added["added"] == 30 and added["count"] == 60
    text = _run(["index", "add", str(tmp_path / "torch"), "--images", str(path_list), "--runtime", "auto"])
    assert "extraction runtime torch: 31 images to embed: too few" in text


def test_shards_of_both_runtimes_merge_into_one_index(tiny_checkpoint, path_list, tmp_path):
    common = ["--encoder", str(tiny_checkpoint), "--images", str(path_list), "--chunk-size", "8"]
    onnx_shard = _json(
        ["index", "build", *common, "--shard", "0/2", "--out", str(tmp_path / "s0"), "--runtime", "onnx"]
    )
    assert onnx_shard["runtime"] == "onnx"
    assert json.loads((tmp_path / "s0" / "extraction.json").read_text())["runtime"] == "onnx"
    _json(["index", "build", *common, "--shard", "1/2", "--out", str(tmp_path / "s1"), "--runtime", "torch"])
    merged = _json(["index", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")])
    assert merged["count"] == 30 and merged["skipped"] == 1

    resumed = _run(
        ["index", "build", *common, "--shard", "0/2", "--out", str(tmp_path / "s0"), "--runtime", "torch"], 2
    )
    assert "runtime: onnx vs torch" in resumed and "--runtime onnx" in resumed


def test_runtime_flag_is_explained_and_checked(tiny_checkpoint, path_list, tmp_path):
    from indexing.extract_job import AUTO_ONNX_MIN_IMAGES

    for command in (["index", "build"], ["index", "add"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        text = " ".join(result.output.replace("│", " ").split())  # rich wraps help inside a box
        assert "auto|onnx|torch" in text and "ONNX Runtime on the CPU" in text
        assert f"at least {AUTO_ONNX_MIN_IMAGES} images" in text and "--threads" in text
    args = ["index", "build", "--encoder", str(tiny_checkpoint), "--images", str(path_list), "--out", str(tmp_path)]
    output = _run([*args, "--runtime", "tensorrt"], code=2)
    assert "error: --runtime must be one of auto, torch, onnx, got 'tensorrt'" in " ".join(output.split())
