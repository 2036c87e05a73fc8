"""The training-objective seam: what one training loop needs to know about what it trains.

``training.trainer.Trainer`` owns everything that is the same for every way of training (the batch stream,
AdamW and the schedule, AMP and gradient clipping, resume, progress, periodic evaluation, the JSONL log).
An objective owns the rest:

* the modules: the trainable ones (an encoder and its loss's proxies; a student; a cohort) and any frozen
  ones (a teacher), and how their parameters split into optimiser groups;
* how a batch becomes a scalar loss (``loss``);
* what a run's result is (``output_encoder``) and which encoders a checkpoint must hold (``checkpoint_encoders``);
* the extra state a bit-exact resume needs beyond those weights (``state_dict`` / ``load_state_dict``);
* how the validation set is scored (``evaluate``) and what goes into the encoder's provenance.

Adding a way of training is writing one subclass and registering it in ``OBJECTIVES`` under the name that a
config's ``objective`` field selects (``metric``, ``mutual`` and ``distillation`` are built in).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retrieval.registry import Registry

if TYPE_CHECKING:
    from models.encoder import Encoder, EncoderConfig
    from retrieval.data.datasets import LabelledImageDataset
    from retrieval.evaluation.report import EvaluationReport
    from training.config import TrainConfig

__all__ = ["OBJECTIVES", "Batch", "EmbedFn", "TrainingObjective", "create_objective"]

#: ``encoder, dataset -> (N, D) float32 L2-normalised embeddings``, with the encoder's own eval preprocessing.
EmbedFn = Callable[["Encoder", "LabelledImageDataset"], Any]


@dataclass(frozen=True)
class Batch:
    """One training step's input, already on the training device.

    Attributes:
        images: ``(B, 3, H, W)`` augmented, normalised images. Under ``torchrun``, this rank's slice of the
            global batch: an objective passes what it embeds through ``training.distributed.gather_embeddings``
            (the identity in one process) before a loss, so the loss sees the global batch.
        labels: ``(B, L)`` int64 labels, finest level first (of the global batch, under ``torchrun`` too).
        indices: ``(B,)`` int64 positions of the images in the training dataset (what a per-image cache,
            such as the teacher's embeddings, is looked up by); of the global batch, like ``labels``.
        step: the 0-based optimiser step this batch trains (a seed for anything drawn per step).
        epoch: the sampler epoch the batch belongs to (for what is refreshed once per epoch).
        epochs_done: ``step / steps per epoch``: the epochs trained before this batch, fractional (for what is
            warmed up over epochs).
        views: with an objective that asks for ``views_per_image > 1``, every view of the batch, each ``(B, 3, H,
            W)`` and its own random augmentation of the same images (``images`` is ``views[0]``); else empty.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    step: int
    epoch: int = 0
    epochs_done: float = 0.0
    views: tuple[torch.Tensor, ...] = ()

    def view(self, index: int) -> torch.Tensor:
        """The ``index``-th augmentation of the batch (``images`` when the objective asked for one view)."""
        return self.views[index] if self.views else self.images


class TrainingObjective(nn.Module, ABC):
    """Base class of every objective; an ``nn.Module`` so ``.to(device)``, ``.train()`` and ``.eval()`` reach
    every module it holds.

    Subclasses set ``self.autocast`` (a zero-argument context-manager factory) through :meth:`set_autocast`
    before training; the trainer calls it with the run's AMP settings.
    """

    def __init__(self) -> None:
        super().__init__()
        self._autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def set_autocast(self, factory: Callable[[], contextlib.AbstractContextManager]) -> None:
        """The context the forward passes run under (mixed precision on CUDA, nothing on CPU)."""
        self._autocast = factory

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast()

    @abstractmethod
    def output_encoder(self) -> Encoder:
        """The encoder a finished run saves as its result (``out_dir/encoder``)."""

    def checkpoint_encoders(self) -> dict[str, Encoder]:
        """Encoders a resumable checkpoint must hold, by name (``encoder`` is the run's result)."""
        return {"encoder": self.output_encoder()}

    def extra_outputs(self) -> dict[str, Encoder]:
        """Encoders a finished run saves beside its result, by path relative to the run directory (a cohort's
        models: ``members/0``...); each gets the run's provenance."""
        return {}

    def model_section(self) -> EncoderConfig:
        """The ``model`` section the run's resolved ``config.yaml`` records: the output encoder's config (a student
        takes its teacher's dimension), or what a cohort builds its models from."""
        return self.output_encoder().config

    @property
    def views_per_image(self) -> int:
        """Augmentations of each training image a batch carries (``Batch.views``); 1 for most objectives."""
        return 1

    def per_rank_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that see a batch only through this rank's own images: the checkpointed encoders'.

        Under ``torchrun`` each rank embeds its slice of the global batch and gathers the embeddings
        (``training.distributed``): these parameters' gradients are partial on every rank and are summed across
        ranks; every other trainable parameter (a loss's proxies) sees the gathered batch whole, its gradient is
        complete on every rank and is averaged. An objective whose trainable modules run on the gathered batch
        itself overrides this.
        """
        params: dict[int, nn.Parameter] = {}
        for encoder in self.checkpoint_encoders().values():
            for param in encoder.parameters():
                if param.requires_grad:
                    params.setdefault(id(param), param)
        return list(params.values())

    @abstractmethod
    def param_groups(self, optim: Any) -> list[dict[str, Any]]:
        """AdamW parameter groups (see ``training.optim.param_groups``) over every trainable parameter."""

    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """The scalar training loss of ``batch`` (called in train mode, gradients enabled)."""

    def state_dict_extra(self) -> dict[str, Any]:
        """State beyond the checkpointed encoders that resuming needs (loss proxies, a miner's epoch...).

        Returned entries are stored in the checkpoint's ``train_state.pt`` and must be tensors, numbers,
        strings or plain containers (the file is read with ``weights_only=True``).
        """
        return {}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict_extra`, given the whole train state."""

    @abstractmethod
    def evaluate(self, dataset: LabelledImageDataset, embed: EmbedFn) -> EvaluationReport:
        """Score the validation set (the report the run logs and returns)."""

    def provenance(self) -> dict[str, Any]:
        """Facts about how the output encoder was trained, merged into its ``provenance``."""
        return {}


#: ``name -> builder(config: TrainConfig, train_dataset: LabelledImageDataset) -> TrainingObjective``.
OBJECTIVES: Registry[Callable[..., TrainingObjective]] = Registry("training objective")


def create_objective(config: TrainConfig, train_dataset: LabelledImageDataset) -> TrainingObjective:
    """Build the objective ``config.objective`` names (the built-in ones register on first use)."""
    import training.objectives.distillation
    import training.objectives.metric
    import training.objectives.mutual  # noqa: F401  (registers "metric", "distillation", "mutual")

    return OBJECTIVES.get(config.objective)(config, train_dataset)
