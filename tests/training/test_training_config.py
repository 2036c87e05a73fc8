"""Loading training recipes: defaults < YAML < overrides, strict keys, packaged recipe lookup."""

from __future__ import annotations

import pytest

from retrieval.config import ConfigError, load_config, save_config
from training.config import TrainConfig
from training.recipe_paths import available_recipes, find_recipe, recipe_path


def test_quickstart_recipe_loads_with_overrides():
    cfg = load_config(TrainConfig, recipe_path("quickstart"), ["optim.lr=5e-4", "loss.params.levels=[fine, coarse]"])
    assert cfg.name == "quickstart"
    assert cfg.model.backbone == "resnet10t" and cfg.model.preprocess.input_size == 64
    assert cfg.optim.lr == 5e-4
    assert cfg.loss.params == {"scale": 16.0, "levels": ["fine", "coarse"]}
    assert cfg.optim.gem_p_lr_mult == 10.0  # a default the recipe does not set
    assert cfg.schedule.resolved_warmup_steps() == round(0.05 * cfg.schedule.max_steps)
    short = load_config(TrainConfig, recipe_path("quickstart"), ["schedule.max_steps=20"])
    assert short.schedule.resolved_warmup_steps() == 1


def test_unknown_keys_and_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(TrainConfig, recipe_path("quickstart"), ["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(TrainConfig, None, ["schedule.max_steps=10", "schedule.warmup_steps=10"])
    with pytest.raises(ConfigError, match="train_csv"):
        load_config(TrainConfig, None, ["data.source=csv"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  classes_per_batch: 0\n")
    with pytest.raises(ConfigError, match=r"sampler\.classes_per_batch"):
        load_config(TrainConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TrainConfig, recipe_path("quickstart.yaml"), ["data.source=csv", "data.train_csv=/x/train.csv"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg


def test_recipe_lookup_lists_available_recipes():
    assert "quickstart" in available_recipes()
    assert recipe_path("quickstart").is_file()
    with pytest.raises(FileNotFoundError, match="quickstart"):
        recipe_path("does-not-exist")


def test_find_recipe_prefers_files_then_packaged_names(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert find_recipe(mine) == mine
    assert find_recipe("quickstart") == recipe_path("quickstart")
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        find_recipe(tmp_path / "missing.yaml")
