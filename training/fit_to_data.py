"""Fit a recipe's per-level settings to the label levels of the data it trains on.

A recipe is written once (``csl-resnet34-dyml`` for DyML's fine/middle/coarse) and then used on data with
other levels: a CSV of ``path,fine,coarse``, or a folder of class folders (``fine`` only). The settings that
depend on the levels follow the data by these rules, each change logged once and kept in the resolved
``config.yaml`` of the run:

* ``loss.params.levels``: level names must be levels of the data (else an error naming the key).
* ``loss.params.margins`` (Cross-Scale Learning, one margin per level, finest first): unset, the loss takes
  ``0.25 + 0.1 k`` for level ``k``. A list of another length is read by level name when it has one value per
  default level (fine, middle, coarse) and the data's levels are among those names: the values of the
  levels present are kept (``[0.25, 0.35, 0.45]`` on fine/coarse data becomes ``[0.25, 0.45]``, the margins
  the recipe gave those two levels). Any other mismatch is an error naming ``loss.params.margins``.
* Losses with one head per level (``multiscale_*``) size themselves from the data: nothing to adapt.
* ``sampler.parent_level``: unset, the level just above the finest; a name that is not a level of the data,
  or the finest level itself, is an error naming the key.
* ``sampler.siblings``: with a single level there is no parent to group siblings under: turned off (1).
* ``sampler.classes_per_batch``: at most the number of fine classes in the training data (a batch then holds
  all of them), so a small photo collection trains with a recipe made for a large one.
"""

from __future__ import annotations

import logging
from typing import Any

from retrieval.config import ConfigError
from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.labels import DEFAULT_LEVELS, LabelSchema
from training.config import LossConfig, SamplerConfig, TrainConfig

__all__ = ["PER_LEVEL_LOSS_PARAMS", "fit_to_data"]

logger = logging.getLogger(__name__)

#: Loss parameters that hold one value per label level, finest first.
PER_LEVEL_LOSS_PARAMS: tuple[str, ...] = ("margins",)


def fit_to_data(config: TrainConfig, dataset: LabelledImageDataset) -> TrainConfig:
    """``config`` with its loss and sampler settings fitted to ``dataset``'s levels and classes (rules above).

    Raises:
        ConfigError: a setting that names levels the data does not have, or per-level values that cannot be
            matched to the data's levels; the message names the key.
    """
    schema = dataset.schema
    loss = _fit_loss(config.loss, schema)
    sampler = _fit_sampler(config.sampler, schema, dataset.vocab.num_classes(0))
    return config.model_copy(update={"loss": loss, "sampler": sampler})


def _fit_loss(loss: LossConfig, schema: LabelSchema) -> LossConfig:
    params = dict(loss.params)
    levels = params.get("levels")
    if levels is not None:
        if not isinstance(levels, list | tuple):
            raise ConfigError(f"loss.params.levels: a list of level names (finest first), got {levels!r}")
        for level in levels:
            if isinstance(level, str) and level not in schema.levels:
                raise ConfigError(
                    f"loss.params.levels: {level!r} is not a level of the training data (its levels: "
                    f"{', '.join(schema.levels)})"
                )
    for key in PER_LEVEL_LOSS_PARAMS:
        if key in params and params[key] is not None:
            params[key] = _per_level_values(key, params[key], schema)
    if params == loss.params:
        return loss
    return loss.model_copy(update={"params": params})


def _per_level_values(key: str, values: Any, schema: LabelSchema) -> list[Any]:
    if not isinstance(values, list | tuple):
        raise ConfigError(f"loss.params.{key}: one value per label level (finest first), got {values!r}")
    values = list(values)
    if len(values) == schema.num_levels:
        return values
    by_name = len(values) == len(DEFAULT_LEVELS) and set(schema.levels) <= set(DEFAULT_LEVELS)
    if not by_name:
        raise ConfigError(
            f"loss.params.{key}: {len(values)} values {values} for the {schema.num_levels} label level(s) of the "
            f"training data ({', '.join(schema.levels)}); give one per level, finest first, or leave it unset"
        )
    fitted = [values[DEFAULT_LEVELS.index(level)] for level in schema.levels]
    logger.warning(
        "loss.params.%s: the recipe gives %s for %s; the training data has %s, so %s is used",
        key,
        values,
        ", ".join(DEFAULT_LEVELS),
        ", ".join(schema.levels),
        fitted,
    )
    return fitted


def _fit_sampler(sampler: SamplerConfig, schema: LabelSchema, fine_classes: int) -> SamplerConfig:
    if sampler.kind != "pk":
        return sampler
    update: dict[str, Any] = {}
    classes = sampler.classes_per_batch
    if classes > fine_classes:
        logger.warning(
            "sampler.classes_per_batch=%d exceeds the %d fine classes of the training data; batches hold all %d",
            classes,
            fine_classes,
            fine_classes,
        )
        classes = update["classes_per_batch"] = fine_classes
    siblings = sampler.siblings
    if siblings > 1 and schema.num_levels == 1:
        logger.info("sampler.siblings: the training data has one label level (no parent classes); siblings off")
        siblings = update["siblings"] = 1
    if siblings > classes:
        siblings = update["siblings"] = classes
    if siblings > 1:  # an unused parent_level is left as written
        parent = _parent_level(sampler.parent_level, schema)
        if parent != sampler.parent_level:
            update["parent_level"] = parent
    if not update:
        return sampler
    # the fields are validated together (siblings <= classes_per_batch): build the fitted section at once
    return SamplerConfig.model_validate({**sampler.model_dump(), **update})


def _parent_level(level: str | None, schema: LabelSchema) -> str | None:
    if level is None:
        return schema.levels[1] if schema.num_levels > 1 else None
    if level not in schema.levels:
        raise ConfigError(
            f"sampler.parent_level: {level!r} is not a level of the training data (its levels: "
            f"{', '.join(schema.levels)}); leave it unset for the level above the finest"
        )
    if schema.index(level) == 0:
        raise ConfigError(
            f"sampler.parent_level: {level!r} is the finest level; siblings are grouped under a coarser one "
            f"({', '.join(schema.levels[1:]) or 'none in this data'})"
        )
    return level
