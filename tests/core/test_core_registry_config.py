"""The shared registry type and the typed-config merge order."""

from __future__ import annotations

import pytest

from retrieval.config import ConfigError, StrictModel, apply_overrides, load_config
from retrieval.registry import Registry, UnknownNameError


def test_registry_rejects_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    reg.register("b")(2)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; valid names: a, b"):
        reg.get("c")


class _Optim(StrictModel):
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)


class _Config(StrictModel):
    name: str = "default"
    steps: int = 10
    optim: _Optim = _Optim()


def test_merge_order_defaults_yaml_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: recipe\noptim:\n  lr: 0.01\n")
    cfg = load_config(_Config, recipe, ["optim.lr=0.5", "steps=3"])
    assert cfg.name == "recipe" and cfg.steps == 3 and cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.999)


def test_unknown_keys_and_bad_values_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(_Config, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(_Config, None, ["steps=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(_Config, tmp_path / "missing.yaml")
