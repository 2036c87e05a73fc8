"""Metric learning of one encoder: ``loss(encoder(images), labels)`` with any loss of the registry.

This is the objective every recipe trained before objectives existed, kept step for step: the encoder is
built before the loss (so the RNG draws, and the quickstart's weights, are what they were), the loss runs in
full precision on the encoder's output, and the loss's parameters (proxies) are the ``loss`` optimiser group.
A ``mixup`` section adds Metrix's mixed loss (``training.mixup``).

Under ``torchrun`` the encoder embeds this rank's slice of the batch and the loss runs on the embeddings
gathered from every rank (``training.distributed.gather_embeddings``), so its value is the global batch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from models.encoder import Encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.labels import class_parents
from retrieval.evaluation.protocols import evaluate_embeddings
from retrieval.evaluation.report import EvaluationReport
from training.distributed import gather_embeddings
from training.losses import create_loss, is_distillation_loss, needs_hierarchy
from training.mixup import Mixup
from training.objectives.base import OBJECTIVES, Batch, EmbedFn, TrainingObjective
from training.optim import param_groups
from training.starting_weights import build_encoder

if TYPE_CHECKING:
    from training.config import OptimConfig, TrainConfig

__all__ = ["MetricLearningObjective", "build_metric_loss", "build_mixup", "mixup_provenance", "model_loss"]


@OBJECTIVES.register("metric")
class MetricLearningObjective(TrainingObjective):
    """One encoder trained with a metric loss from ``training.losses.LOSSES``.

    Args:
        config: the run's config (``model``, ``loss``, ``backbone_weights``, ``init_from`` are read).
        train_dataset: the training images; the loss's class counts and class tree come from its labels.
    """

    def __init__(self, config: TrainConfig, train_dataset: LabelledImageDataset) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.loss_fn = build_metric_loss(config, train_dataset)
        self.mixup = build_mixup(config, self.loss_fn, train_dataset)

    def output_encoder(self) -> Encoder:
        return self.encoder

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        return param_groups(self.encoder, self.loss_fn, optim)

    def loss(self, batch: Batch) -> torch.Tensor:
        loss, _ = model_loss(self.encoder, self.loss_fn, self.mixup, batch.images, batch, self.autocast)
        return loss

    def state_dict_extra(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict()}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(state["loss"])

    def evaluate(self, dataset: LabelledImageDataset, embed: EmbedFn) -> EvaluationReport:
        return evaluate_embeddings(embed(self.encoder, dataset), dataset.labels, schema=dataset.schema)

    def provenance(self) -> dict[str, Any]:
        return {"loss": self.config.loss.name, **mixup_provenance(self.config)}


def build_metric_loss(config: TrainConfig, train_dataset: LabelledImageDataset) -> torch.nn.Module:
    """The recipe's loss, sized for the training labels (level names in ``loss.params.levels`` resolved).

    Raises:
        ConfigError: a distillation loss (it needs a teacher: ``retrieval distill``), or parameters the
            loss does not take.
        DatasetError: a loss that needs nested labels on labels that are not nested.
    """
    schema, vocab = train_dataset.schema, train_dataset.vocab
    name = config.loss.name
    if is_distillation_loss(name):
        raise ConfigError(
            f"loss {name!r} distils a teacher: train it with `retrieval distill` (objective distillation)"
        )
    params = dict(config.loss.params)
    if "hierarchy" in params:
        raise ConfigError("loss.params.hierarchy is not a setting: the class tree is read from the training labels")
    if params.get("levels") is not None:  # level names from a recipe -> label columns
        try:
            params["levels"] = [schema.index(v) if isinstance(v, str) else v for v in params["levels"]]
        except ValueError as exc:
            raise ConfigError(f"loss.params.levels: {exc}") from None
    num_classes = [vocab.num_classes(k) for k in range(schema.num_levels)]
    hierarchy = None
    if needs_hierarchy(name):  # the class tree, read once from the training labels
        try:
            hierarchy = class_parents(train_dataset.labels, num_classes[0])
        except ValueError as exc:
            raise DatasetError(f"loss {name!r} needs nested labels: {exc}") from None
    return create_loss(name, num_classes, config.model.embedding_dim, hierarchy=hierarchy, **params)


def build_mixup(
    config: TrainConfig, loss_fn: torch.nn.Module, train_dataset: LabelledImageDataset, *, stream: int = 0
) -> Mixup | None:
    """The recipe's Metrix step for ``loss_fn`` (``None`` without a ``mixup`` section).

    Raises:
        ConfigError: an unknown ``mixup.level``, or a loss without a soft-label form.
    """
    if config.mixup is None:
        return None
    level = 0
    if config.mixup.level is not None:
        try:
            level = train_dataset.schema.index(config.mixup.level)
        except ValueError as exc:
            raise ConfigError(f"mixup.level: {exc}") from None
    return Mixup(config.mixup, loss_fn, level=level, seed=config.seed, stream=stream)


def mixup_provenance(config: TrainConfig) -> dict[str, Any]:
    """What an encoder's provenance records of the run's Metrix settings (nothing without a ``mixup`` section)."""
    return {} if config.mixup is None else {"mixup": config.mixup.model_dump()}


def model_loss(
    encoder: Encoder,
    loss_fn: torch.nn.Module,
    mixup: Mixup | None,
    images: torch.Tensor,
    batch: Batch,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, clean float32 embeddings)`` of one model on ``images`` (the batch's, or one of its views).

    The forward pass runs under ``autocast``; the loss in full precision, with Metrix's mixed loss added when the
    model has a ``mixup`` step. Shared by the metric objective and each model of a DM² cohort.

    Under ``torchrun`` ``images`` is this rank's slice and the embeddings are gathered before the loss (the
    returned ones are the global batch's); Metrix's mixed items are made by ``Mixup.embed``.
    """
    if mixup is None:
        with autocast():
            clean = encoder(images)
        clean = gather_embeddings(clean.float())
        return loss_fn(clean, batch.labels), clean
    pairs = mixup.pairs(batch.labels, batch.step)
    with autocast():
        clean, mixed = mixup.embed(encoder, images, pairs)
    return mixup.loss(clean, batch.labels, mixed, pairs), clean
