"""A recipe's per-level settings follow the levels of the data it trains on, or fail naming the key."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from retrieval.config import ConfigError
from retrieval.data.datasets import InMemoryImageDataset
from retrieval.data.labels import LabelSchema, LabelVocabulary
from training.config import TrainConfig
from training.fit_to_data import fit_to_data


def _dataset(levels: tuple[str, ...], fine: int = 6) -> InMemoryImageDataset:
    """``fine`` classes x 2 images; the coarser levels nest (fine f -> f // 2 -> f // 4)."""
    schema = LabelSchema(levels)
    vocab = LabelVocabulary(schema)
    rows = [[f"{level}{f // 2**k}" for k, level in enumerate(levels)] for f in range(fine) for _ in range(2)]
    labels = np.array([vocab.encode(row) for row in rows])
    images = np.zeros((len(rows), 8, 8, 3), dtype=np.uint8)
    return InMemoryImageDataset(images, labels, schema, vocab, [str(i) for i in range(len(rows))])


def _config(**sections) -> TrainConfig:
    return TrainConfig.model_validate({"sampler": {"classes_per_batch": 4, "images_per_class": 2}, **sections})


def test_three_default_margins_are_read_by_level_name_on_fewer_levels(caplog):
    config = _config(loss={"name": "csl", "params": {"margins": [0.25, 0.35, 0.45], "gamma": 32.0}})
    with caplog.at_level(logging.WARNING, logger="training.fit_to_data"):
        fitted = fit_to_data(config, _dataset(("fine", "coarse")))
    assert fitted.loss.params == {"margins": [0.25, 0.45], "gamma": 32.0}  # fine's and coarse's margins
    assert "loss.params.margins" in caplog.text
    assert fit_to_data(config, _dataset(("fine",))).loss.params["margins"] == [0.25]
    same = fit_to_data(config, _dataset(("fine", "middle", "coarse")))
    assert same.loss == config.loss  # nothing to adapt


def test_margins_that_cannot_be_matched_name_the_key():
    two = _config(loss={"name": "csl", "params": {"margins": [0.2, 0.3]}})
    with pytest.raises(ConfigError, match=r"^loss\.params\.margins: 2 values \[0\.2, 0\.3\] for the 3 label level"):
        fit_to_data(two, _dataset(("fine", "middle", "coarse")))
    three = _config(loss={"name": "csl", "params": {"margins": [0.2, 0.3, 0.4]}})
    with pytest.raises(ConfigError, match=r"^loss\.params\.margins: .*\(sku, category\)"):
        fit_to_data(three, _dataset(("sku", "category")))  # not fine/middle/coarse: no name to match by
    scalar = _config(loss={"name": "csl", "params": {"margins": 0.3}})
    with pytest.raises(ConfigError, match=r"^loss\.params\.margins: one value per label level"):
        fit_to_data(scalar, _dataset(("fine", "coarse")))


def test_loss_levels_must_be_levels_of_the_data():
    config = _config(loss={"name": "multiscale_cosface", "params": {"levels": ["fine", "middle"]}})
    with pytest.raises(ConfigError, match=r"^loss\.params\.levels: 'middle' is not a level .*fine, coarse"):
        fit_to_data(config, _dataset(("fine", "coarse")))
    assert fit_to_data(config, _dataset(("fine", "middle", "coarse"))).loss == config.loss


@pytest.mark.parametrize(
    ("levels", "parent"), [(("fine", "middle", "coarse"), "middle"), (("fine", "coarse"), "coarse"), (("a", "b"), "b")]
)
def test_parent_level_defaults_to_the_level_above_the_finest(levels, parent):
    fitted = fit_to_data(_config(sampler={"classes_per_batch": 4, "siblings": 2}), _dataset(levels))
    assert fitted.sampler.parent_level == parent and fitted.sampler.siblings == 2


def test_one_level_turns_siblings_off():
    fitted = fit_to_data(_config(sampler={"classes_per_batch": 4, "siblings": 2}), _dataset(("fine",)))
    assert fitted.sampler.siblings == 1 and fitted.sampler.parent_level is None


def test_a_named_parent_level_must_be_a_coarser_level_of_the_data():
    named = _config(sampler={"classes_per_batch": 4, "siblings": 2, "parent_level": "middle"})
    with pytest.raises(ConfigError, match=r"^sampler\.parent_level: 'middle' is not a level .*fine, coarse"):
        fit_to_data(named, _dataset(("fine", "coarse")))
    finest = _config(sampler={"classes_per_batch": 4, "siblings": 2, "parent_level": "fine"})
    with pytest.raises(ConfigError, match=r"^sampler\.parent_level: 'fine' is the finest level"):
        fit_to_data(finest, _dataset(("fine", "coarse")))
    unused = _config(sampler={"classes_per_batch": 4, "siblings": 1, "parent_level": "middle"})
    assert fit_to_data(unused, _dataset(("fine", "coarse"))).sampler == unused.sampler  # not used: left as written


def test_classes_per_batch_is_lowered_to_the_fine_classes_of_the_data(caplog):
    config = _config(sampler={"classes_per_batch": 16, "images_per_class": 2, "siblings": 8})
    with caplog.at_level(logging.WARNING, logger="training.fit_to_data"):
        fitted = fit_to_data(config, _dataset(("fine", "coarse"), fine=6))
    assert fitted.sampler.classes_per_batch == 6 and fitted.sampler.siblings == 6
    assert "sampler.classes_per_batch=16 exceeds the 6 fine classes" in caplog.text
    aspect = _config(sampler={"kind": "aspect", "batch_size": 4})
    assert fit_to_data(aspect, _dataset(("fine",))).sampler == aspect.sampler  # labels play no part there
