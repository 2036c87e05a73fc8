"""DM², Diversified Mutual Metric Learning (Park et al.): a cohort of encoders that teach each other, as one
training objective of the one training loop.

Each model ``l`` of the cohort has its own encoder, metric loss (with its proxies) and, optionally, Metrix mixup.
On a batch every model embeds the images and forms its relation matrix, the pairwise Euclidean distances
``Psi^l_ij = D(e^l_i, e^l_j)``. Its loss is its metric loss plus ``lam`` times the mean over partners ``k`` of
``(1/N^2) sum_ij (Psi^l_ij - Psi^k_ij)^2``, the partner's matrix taken without gradient, so each model moves
towards the others' view of the batch and none is pulled by its own reflection. ``lam`` rises linearly from 0 to
``mutual.weight`` over ``mutual.warmup_epochs``. The three diversities of the paper:

* model diversity: each model starts from its own random weights (``model_diversity``), or from a different
  architecture (``mutual.members[].model``);
* temporal diversity: model ``l`` (0-based here) updates with probability ``2^-l``; a model that skips a step still
  embeds the batch (without gradient) as the others' partner, and its parameters get no gradient, so AdamW leaves
  them, and their moments, untouched;
* view diversity: model ``l`` embeds its own random augmentation of the batch (``Batch.views``).

The run's result is the ensemble (``models.ensemble.EnsembleEncoder``: the models' embeddings concatenated and
re-normalised), which indexes, exports and serves like any encoder; each model is saved too (``members/<l>``).

Under ``torchrun`` every model's embeddings of this rank's slice are gathered (``model_loss`` does it for the
models that step, ``loss`` for the partners), so the relation matrices are the global batch's ``N x N``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.encoder import Encoder, EncoderConfig
from models.ensemble import EnsembleEncoder, join_embeddings
from retrieval.config import ConfigError
from retrieval.data.datasets import LabelledImageDataset
from retrieval.evaluation.protocols import evaluate_embeddings
from retrieval.evaluation.report import EvaluationReport
from training.distributed import gather_embeddings
from training.objectives.base import OBJECTIVES, Batch, EmbedFn, TrainingObjective
from training.objectives.metric import build_metric_loss, build_mixup, mixup_provenance, model_loss
from training.optim import param_groups
from training.starting_weights import build_encoder

if TYPE_CHECKING:
    from training.config import MutualConfig, OptimConfig, TrainConfig
    from training.mixup import Mixup

__all__ = ["MutualLearningObjective", "relation_loss", "relation_matrix", "update_probability"]

logger = logging.getLogger(__name__)

# Tells the temporal-diversity draws apart from every other draw seeded by (seed, step).
_TEMPORAL_STREAM = 0x444D32


def relation_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` Euclidean distances between the rows of ``embeddings``, exactly 0 on the diagonal.

    The square root's gradient is infinite at 0, so the diagonal is masked out rather than differentiated
    (``torch.cdist`` returns NaN gradients there).
    """
    embeddings = embeddings.float()
    squared = embeddings.pow(2).sum(1)
    gram = embeddings @ embeddings.T
    distances_sq = (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(1e-12)
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return torch.where(eye, torch.zeros_like(distances_sq), distances_sq.sqrt())


def relation_loss(own: torch.Tensor, partners: list[torch.Tensor]) -> torch.Tensor:
    """``mean_k (1/N^2) sum_ij (own_ij - partner_k_ij)^2``, each partner's matrix without gradient."""
    if not partners:
        raise ValueError("the relation loss needs at least one partner")
    return torch.stack([(own - partner.detach()).pow(2).mean() for partner in partners]).mean()


def update_probability(model_index: int) -> float:
    """Temporal diversity's chance that model ``model_index`` (0-based) takes a step: ``2^-index``."""
    return 2.0**-model_index


@OBJECTIVES.register("mutual")
class MutualLearningObjective(TrainingObjective):
    """A DM² cohort (``config.mutual``): several encoders, each with its own metric loss, learning together.

    Args:
        config: the run's config; ``mutual`` says the cohort, ``model`` / ``loss`` are every model's defaults.
        train_dataset: the training images (class counts and the class tree of the losses).

    Raises:
        ConfigError: no ``mutual`` section, a member override that does not validate, a distillation loss.
    """

    def __init__(self, config: TrainConfig, train_dataset: LabelledImageDataset) -> None:
        super().__init__()
        if config.mutual is None:
            raise ConfigError("objective mutual needs a mutual section (mutual: {size: 2} at least)")
        self.config = config
        self.mutual: MutualConfig = config.mutual
        self.base_model = config.model
        member_configs = _member_configs(config)
        encoders, losses, mixups = [], [], []
        for index, member_config in enumerate(member_configs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_member_seed(config.seed, index, self.mutual.model_diversity))
                encoders.append(build_encoder(member_config))
                losses.append(build_metric_loss(member_config, train_dataset))
            mixups.append(build_mixup(member_config, losses[-1], train_dataset, stream=index))
        self.models = nn.ModuleList(encoders)
        self.losses = nn.ModuleList(losses)
        self.mixups: list[Mixup | None] = mixups
        self.loss_names = [member_config.loss.name for member_config in member_configs]
        self.ensemble = EnsembleEncoder.from_members(encoders)
        self.last_reports: dict[str, EvaluationReport] = {}

    # ------------------------------------------------------------------ the seam

    def output_encoder(self) -> Encoder:
        return self.ensemble

    def extra_outputs(self) -> dict[str, Encoder]:
        return {f"members/{index}": encoder for index, encoder in enumerate(self.models)}

    def model_section(self) -> EncoderConfig:
        return self.base_model

    @property
    def views_per_image(self) -> int:
        return len(self.models) if self.mutual.view_diversity else 1

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        groups = []
        for index, (encoder, loss_fn) in enumerate(zip(self.models, self.losses, strict=True)):
            for group in param_groups(encoder, loss_fn, optim):
                groups.append({**group, "name": f"model{index}/{group['name']}"})
        return groups

    def updating(self, step: int) -> list[bool]:
        """Which models take this step: all of them, or, with temporal diversity, model ``l`` with chance ``2^-l``."""
        if not self.mutual.temporal_diversity:
            return [True] * len(self.models)
        draws = [
            np.random.default_rng([self.config.seed, step, index, _TEMPORAL_STREAM]).random()
            for index in range(len(self.models))
        ]
        return [index == 0 or draw < update_probability(index) for index, draw in enumerate(draws)]

    def relation_weight(self, epochs_done: float) -> float:
        """``lam`` after ``epochs_done`` epochs: linear from 0 to ``mutual.weight`` over the warm-up, then flat."""
        warmup = self.mutual.warmup_epochs
        if warmup <= 0:
            return self.mutual.weight
        return self.mutual.weight * min(1.0, epochs_done / warmup)

    def loss(self, batch: Batch) -> torch.Tensor:
        updating = self.updating(batch.step)
        embeddings: list[torch.Tensor] = []
        metric_losses: list[torch.Tensor | None] = []
        for index, (encoder, loss_fn, mixup) in enumerate(zip(self.models, self.losses, self.mixups, strict=True)):
            images = batch.view(index) if self.mutual.view_diversity else batch.images
            if not updating[index]:  # a partner this step: its distances matter, its parameters do not move
                with torch.no_grad(), self.autocast():
                    embeddings.append(gather_embeddings(encoder(images).float()))  # the global batch's (torchrun)
                metric_losses.append(None)
                continue
            metric, clean = model_loss(encoder, loss_fn, mixup, images, batch, self.autocast)
            metric_losses.append(metric)
            embeddings.append(clean)
        relations = [relation_matrix(vectors) for vectors in embeddings]
        weight = self.relation_weight(batch.epochs_done)
        total = embeddings[0].new_zeros(())
        for index, metric in enumerate(metric_losses):
            if metric is None:
                continue
            partners = relations[:index] + relations[index + 1 :]
            total = total + metric + weight * relation_loss(relations[index], partners)
        return total

    def state_dict_extra(self) -> dict[str, Any]:
        return {"losses": [loss_fn.state_dict() for loss_fn in self.losses]}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        saved = state["losses"]
        if len(saved) != len(self.losses):
            raise ConfigError(f"the checkpoint holds {len(saved)} cohort losses; this run has {len(self.losses)}")
        for loss_fn, loss_state in zip(self.losses, saved, strict=True):
            loss_fn.load_state_dict(loss_state)

    def evaluate(self, dataset: LabelledImageDataset, embed: EmbedFn) -> EvaluationReport:
        """The ensemble's report; every model's is kept in ``last_reports`` (``model0``..., ``ensemble``).

        Each model embeds the set once; the ensemble's vectors are those embeddings joined
        (``models.ensemble.join_embeddings``, what ``EnsembleEncoder`` computes).
        """
        vectors = [np.asarray(embed(encoder, dataset), dtype=np.float32) for encoder in self.models]
        reports = {
            f"model{index}": evaluate_embeddings(member, dataset.labels, schema=dataset.schema)
            for index, member in enumerate(vectors)
        }
        reports["ensemble"] = evaluate_embeddings(join_embeddings(vectors), dataset.labels, schema=dataset.schema)
        self.last_reports = reports
        for name, report in reports.items():
            summary = ", ".join(f"{key} {100 * value:.2f}" for key, value in report.mean.items())
            logger.info("validation %s (mean over levels): %s", name, summary)
        return reports["ensemble"]

    def provenance(self) -> dict[str, Any]:
        return {"loss": self.loss_names, "mutual": self.mutual.model_dump(), **mixup_provenance(self.config)}


def _member_configs(config: TrainConfig) -> list[TrainConfig]:
    """Each cohort model's run config: the recipe's ``model`` and ``loss`` with the member's overrides."""
    assert config.mutual is not None
    members = config.mutual.members or [None] * config.mutual.size
    configs = []
    for index, member in enumerate(members):
        model, loss = config.model, config.loss
        if member is not None:
            try:
                model = EncoderConfig.model_validate({**config.model.model_dump(), **member.model})
            except ValueError as exc:
                raise ConfigError(f"mutual.members[{index}].model: {' '.join(str(exc).split())}") from None
            loss = member.loss or config.loss
        configs.append(config.model_copy(update={"model": model, "loss": loss}))
    return configs


def _member_seed(seed: int, index: int, model_diversity: bool) -> int:
    """The torch seed model ``index`` is built under: the run's seed for the first model (so it starts as a
    single-model run of that seed would) and for every model without model diversity; its own seed otherwise."""
    if index == 0 or not model_diversity:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
