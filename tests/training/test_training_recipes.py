"""Every packaged recipe validates and builds its loss; the DyML paper recipe trains on the official layout."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.config import load_config
from retrieval.data.synthetic import SyntheticConfig, generate_split
from training.config import DistillConfig, TrainConfig, load_recipe_config
from training.losses import create_loss
from training.recipe_paths import available_recipes, recipe_path
from training.trainer import train


def test_the_issue_recipes_are_packaged():
    assert {"quickstart", "csl-synthetic-cpu", "csl-resnet34-dyml", "cosface-multiscale"} <= set(available_recipes())
    assert {"aml-synthetic-cpu", "aml-effnetb3-glam"} <= set(available_recipes())


def test_the_own_photos_recipe_derives_every_per_level_setting_from_the_data():
    """``retrieval train --images`` trains it: nothing in it may assume fine/middle/coarse."""
    assert "own-photos" in available_recipes()
    config = load_recipe_config(recipe_path("own-photos"), ["data.train_csv=photos.csv"])
    assert config.data.source == "csv" and config.model.pretrained and config.model.backbone == "resnet50"
    assert config.loss.name == "multiscale_normsoftmax" and config.loss.params == {}  # heads follow the data's levels
    assert config.sampler.parent_level is None and config.sampler.siblings == 2


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_validates_and_builds_its_loss(name):
    needs_files = ["data.train_csv=photos.csv"] if name == "own-photos" else []  # --images gives it
    config = load_recipe_config(recipe_path(name), needs_files)
    assert isinstance(config, DistillConfig) == name.startswith("aml-")
    hierarchy = np.array([[f, f // 2, f // 4] for f in range(8)])
    params = dict(config.loss.params)
    if "levels" in params:
        params["levels"] = [("fine", "middle", "coarse").index(v) for v in params["levels"]]
    loss = create_loss(config.loss.name, [8, 4, 2], config.model.embedding_dim, hierarchy=hierarchy, **params)
    assert sum(p.numel() for p in loss.parameters()) >= 0
    assert config.sampler.siblings <= config.sampler.classes_per_batch


def _write_dyml_train(root, synthetic: SyntheticConfig) -> None:
    """The synthetic train split in the released DyML layout: ``train/imgs`` and a glued-header label.csv."""
    dataset = generate_split(synthetic, "train")
    images = root / "train" / "imgs"
    images.mkdir(parents=True)
    rows = []
    for i in range(len(dataset)):
        dataset.load_image(i).save(images / f"{i}.png")
        fine, middle, coarse = (dataset.vocab.names[k][dataset.labels[i, k]] for k in range(3))
        rows.append(f"{i}.png, {coarse}, {middle}, {fine}")
    (root / "train" / "label.csv").write_text("fname, coarse_id, middle_id, fine_id" + "\n".join(rows) + "\n")


def test_paper_recipe_trains_on_the_official_dyml_layout(tmp_path):
    synthetic = SyntheticConfig(seed=1, image_size=32, num_colours=2, num_textures=2, train_per_class=3)
    _write_dyml_train(tmp_path / "dyml", synthetic)
    overrides = [
        f"data.dyml_root={tmp_path / 'dyml'}",
        "data.num_workers=0",
        "model.backbone=resnet10t",  # the recipe's ImageNet ResNet-34 cannot be downloaded here
        "model.pretrained=false",
        "model.embedding_dim=32",
        "model.preprocess.input_size=32",
        "sampler.classes_per_batch=4",
        "schedule.max_steps=2",
        "schedule.warmup_steps=1",
        "device=cpu",
        f"out_dir={tmp_path / 'run'}",
    ]
    config = load_config(TrainConfig, recipe_path("csl-resnet34-dyml"), overrides)
    result = train(config, progress=False)
    assert result.steps == 2 and result.final_loss is not None and np.isfinite(result.final_loss)
    assert (result.encoder_path / "model.safetensors").is_file()
