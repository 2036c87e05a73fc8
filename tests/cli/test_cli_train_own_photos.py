"""`retrieval train --images CSV`: own photos in one command, config errors as one line, budgets said plainly."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from retrieval.cli.main import app
from retrieval.data.synthetic import SyntheticConfig, generate_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: What the tests override in the own-photos recipe: no download, a tiny network, three steps.
SMALL = [
    "--set", "model.pretrained=false",
    "--set", "model.backbone=resnet10t",
    "--set", "model.embedding_dim=16",
    "--set", "model.preprocess.input_size=32",
    "--set", "schedule.max_steps=3",
    "--set", "data.num_workers=0",
    "--set", "device=cpu",
]  # fmt: skip


def _write_photos(root, split: str, levels: tuple[str, ...]) -> None:
    """The synthetic split as PNG files and ``root/<split>.csv`` (``path`` + the chosen label columns)."""
    config = SyntheticConfig(seed=5, image_size=32, num_colours=2, num_textures=2, train_per_class=2, val_per_class=1)
    dataset = generate_split(config, split)
    (root / split).mkdir(parents=True)
    with (root / f"{split}.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *levels])
        for i in range(len(dataset)):
            name = f"{split}/{i}.png"
            dataset.load_image(i).save(root / name)
            labels = dataset.label_names(i)
            writer.writerow([name, *(labels[level] for level in levels)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two-level photos (fine, coarse), as a user's own CSV would hold them."""
    root = tmp_path_factory.mktemp("photos")
    _write_photos(root, "train", ("fine", "coarse"))
    _write_photos(root, "val", ("fine", "coarse"))
    return root


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def test_one_command_trains_own_photos_with_levels_from_the_csv(photos, tmp_path):
    out = tmp_path / "run"
    result = _train(
        "--images", str(photos / "train.csv"), "--val-images", str(photos / "val.csv"), *SMALL, "--out", str(out),
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == summary["planned_steps"] == summary["schedule_steps"] == 3
    assert summary["partial"] is False and summary["stopped"] == "completed" and summary["budget"] is None
    assert list(summary["val"]["per_level"]) == ["fine", "coarse"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["name"] == "own-photos" and resolved["loss"] == {"name": "multiscale_normsoftmax", "params": {}}
    assert resolved["sampler"]["parent_level"] == "coarse" and resolved["sampler"]["siblings"] == 2
    encoder = json.loads((out / "encoder" / "config.json").read_text())["config"]
    assert encoder["levels"] == ["fine", "coarse"] and encoder["provenance"]["dataset"] == str(photos / "train.csv")


def test_a_three_level_recipe_trains_on_a_two_level_csv(photos, tmp_path):
    """The reported crash: csl-synthetic-cpu (margins and parent level for fine/middle/coarse) on fine,coarse."""
    out = tmp_path / "run"
    result = _train(
        "--config", "csl-synthetic-cpu", "--set", "data.source=csv", "--set", f"data.train_csv={photos / 'train.csv'}",
        *SMALL, "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["loss"]["params"]["margins"] == [0.25, 0.45]  # fine's and coarse's margins of the recipe
    assert resolved["sampler"]["parent_level"] == "coarse"
    assert "3 steps (completed)" in result.stdout


def test_a_folder_of_class_folders_trains_one_level_without_siblings(tmp_path):
    config = SyntheticConfig(seed=6, image_size=32, num_colours=2, num_textures=2, train_per_class=2)
    dataset = generate_split(config, "train")
    for i in range(len(dataset)):
        folder = tmp_path / "photos" / dataset.label_names(i)["fine"]
        folder.mkdir(parents=True, exist_ok=True)
        dataset.load_image(i).save(folder / f"{i}.png")
    out = tmp_path / "run"
    result = _train("--images", str(tmp_path / "photos"), *SMALL, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["sampler"]["siblings"] == 1 and resolved["sampler"]["parent_level"] is None
    assert json.loads((out / "encoder" / "config.json").read_text())["config"]["levels"] == ["fine"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.params.foo=1"], "loss.params.foo: not a parameter of loss 'multiscale_normsoftmax' (it takes: scale, "),
        (["loss.name=csl", "loss.params.margins=[0.1, 0.2, 0.3, 0.4]"], "loss.params.margins: 4 values [0.1, 0.2, "),
        (["loss.name=csl", "loss.params.gamma=-1"], "loss.params.gamma: must be positive, got -1"),
        (["loss.name=nope"], "loss.name: unknown loss 'nope'; valid names: "),
        (["model.backbone=resnet_nope"], "model.backbone: unknown timm backbone 'resnet_nope'"),
        (["model.pooling=maxx"], "model.pooling: unknown pooling 'maxx'; valid names: avg, gem, max"),
        (["sampler.parent_level=middle"], "sampler.parent_level: 'middle' is not a level of the training data"),
        (["data.levels=[fine, middle]"], "data.levels: 'middle' not among the columns of "),
        (["optim.lr=-1"], "invalid config: optim.lr: Input should be greater than 0"),
    ],
)
def test_configuration_errors_are_one_line_naming_the_key(photos, tmp_path, overrides, expected):
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = _train("--images", str(photos / "train.csv"), *SMALL, *sets, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.output
    assert "Traceback" not in result.output


def test_weights_refuses_an_engine_checkpoint_and_init_from_starts_from_it(photos, tiny_checkpoint, tmp_path):
    refused = _train("--images", str(photos / "train.csv"), *SMALL, "--weights", str(tiny_checkpoint))
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"error: {tiny_checkpoint} is an encoder checkpoint written by this engine (backbone, pooling and head), not "
        f"backbone weights; start from it with --init-from {tiny_checkpoint}"
    ]
    out = tmp_path / "run"
    started = _train(
        "--images", str(photos / "train.csv"), *SMALL, "--init-from", str(tiny_checkpoint), "--out", str(out), "--json"
    )
    assert started.exit_code == 0, started.output
    payload = json.loads((out / "encoder" / "config.json").read_text())["config"]
    source = json.loads((tiny_checkpoint / "config.json").read_text())
    assert payload["provenance"]["init_from"]["encoder_id"] == source["encoder_id"]
    assert payload["embedding_dim"] == source["config"]["embedding_dim"] == 32  # the checkpoint's, not --set's 16


def test_a_run_stopped_by_its_budget_says_it_is_partial(photos, tmp_path):
    args = ["--images", str(photos / "train.csv"), *SMALL, "--set", "schedule.max_minutes=1e-6"]
    printed = _train(*args, "--out", str(tmp_path / "a"))
    assert printed.exit_code == 0, printed.output
    assert "stopped early at step 1 of 3 (the time budget was spent)" in printed.stdout
    assert "partial run" in printed.stdout
    as_json = _train(*args, "--out", str(tmp_path / "b"), "--json")
    summary = json.loads(as_json.stdout)
    assert (summary["steps"], summary["planned_steps"], summary["schedule_steps"]) == (1, 3, 3)
    assert summary["partial"] is True and summary["stopped"] == "time_budget"


def test_pretrained_weights_offline_fail_in_seconds_naming_weights(photos, tmp_path, monkeypatch):
    """The default recipe asks for ImageNet weights; with no cache and no hub it must fail fast with the fix."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-torch-hub"))
    start = time.perf_counter()
    result = _train("--images", str(photos / "train.csv"), "--set", "data.num_workers=0", "--out", str(tmp_path / "r"))
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2 and elapsed < 20, (elapsed, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.pretrained: pretrained weights for 'resnet50'")
    assert "--weights PATH" in lines[0] and "model.pretrained=false" in lines[0]


@pytest.mark.clothing
def test_own_photos_on_the_real_clothing_csv(clothing_small, tmp_path):
    """Real JPEGs: train on the validation split, validate on the test split, per level (fine, coarse)."""
    rows = list(csv.DictReader((clothing_small / "labels.csv").open()))
    for split, name in (("validation", "train"), ("test", "val")):
        with (tmp_path / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "fine", "coarse"])
            writer.writerows(
                [str(clothing_small / r["path"]), r["fine"], r["coarse"]] for r in rows if r["split"] == split
            )
    result = _train(
        "--images", str(tmp_path / "train.csv"), "--val-images", str(tmp_path / "val.csv"), *SMALL,
        "--set", "model.preprocess.input_size=64", "--out", str(tmp_path / "run"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["val"]["per_level"]) == ["fine", "coarse"]
    for metrics in summary["val"]["per_level"].values():
        assert 0.0 < metrics["mAP"] <= 1.0
