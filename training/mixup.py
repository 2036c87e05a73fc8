"""Metrix: mixup for metric learning (Venkataramanan et al., ICLR 2022), as one step of any metric objective.

Mixup for classification mixes two images and their one-hot labels. A metric loss has no per-image label to
mix: its labels say which *pairs* are positive. Metrix mixes a positive with a negative of an anchor, so the
mixed item is ``lam`` parts positive to that anchor, and scores it with the loss's soft-label form
(``training.losses.soft``), where a pair's positive-ness ``y`` may lie between 0 and 1.

Per step (``MixupConfig`` is the recipe's ``mixup:`` section):

1. :func:`draw_mixing_pairs`: for every anchor of the batch that has a negative, one positive (another image of
   its class; the anchor itself when it has none: anchor-negative mixing) and one negative, both uniform, and
   ``lam ~ Beta(alpha, alpha)``. The draws come from a generator seeded by ``(seed, step, stream)``, so a
   resumed run repeats them and they never touch the global RNGs.
2. :meth:`Mixup.embed`: the clean embeddings and the mixed ones, mixing the images (``input``), the last feature
   map before pooling (``feature``) or the embeddings (``embedding``). Input mixup runs the clean and mixed images
   through the encoder in one pass, so BatchNorm normalises them together, as the reference code does.
3. :meth:`Mixup.loss`: ``loss(clean) + weight * loss.mixed_loss(clean, mixed)``; the soft labels of the mixed
   items are the two sources' labels at every level with weight ``lam`` (``MixedLabels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import ConfigError
from training.distributed import gather_embeddings, gather_shared, gather_tensor, share, world
from training.losses.soft import MixedLabels, SoftLabelLoss

if TYPE_CHECKING:
    from models.encoder import Encoder
    from training.config import MixupConfig

__all__ = ["MixingPairs", "Mixup", "draw_mixing_pairs", "mix", "soft_label_losses"]


@dataclass(frozen=True)
class MixingPairs:
    """Which batch items are mixed, and how much: mixed item ``m`` is ``lam[m] * x[first[m]] + (1 - lam[m]) *
    x[second[m]]``, where ``first[m]`` is a positive of anchor ``anchors[m]`` (or the anchor) and ``second[m]`` a
    negative."""

    anchors: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    lam: torch.Tensor

    def __len__(self) -> int:
        return int(self.first.numel())

    def labels(self, labels: torch.Tensor) -> MixedLabels:
        """The mixed items' soft labels, every level of ``labels`` (``(N,)`` or ``(N, L)``)."""
        matrix = labels[:, None] if labels.ndim == 1 else labels
        return MixedLabels(first=matrix[self.first], second=matrix[self.second], lam=self.lam)


def draw_mixing_pairs(classes: torch.Tensor, alpha: float, rng: np.random.Generator) -> MixingPairs | None:
    """One positive-negative pair per anchor that has a negative in the batch; ``None`` when no anchor has one.

    Args:
        classes: ``(N,)`` class ids at the level that decides positives and negatives.
        alpha: the Beta distribution's parameter.
        rng: the step's generator (every draw comes from it).
    """
    ids = classes.detach().cpu().numpy()
    same = ids[:, None] == ids[None, :]
    anchors, first, second = [], [], []
    for anchor in range(len(ids)):
        negatives = np.flatnonzero(~same[anchor])
        if negatives.size == 0:
            continue
        positives = np.flatnonzero(same[anchor])
        positives = positives[positives != anchor]
        anchors.append(anchor)
        first.append(int(rng.choice(positives)) if positives.size else anchor)
        second.append(int(rng.choice(negatives)))
    if not anchors:
        return None
    lam = rng.beta(alpha, alpha, size=len(anchors))
    device = classes.device
    return MixingPairs(
        anchors=torch.tensor(anchors, device=device),
        first=torch.tensor(first, device=device),
        second=torch.tensor(second, device=device),
        lam=torch.from_numpy(lam).float().to(device),
    )


def mix(values: torch.Tensor, pairs: MixingPairs) -> torch.Tensor:
    """``lam * values[first] + (1 - lam) * values[second]``, ``lam`` broadcast over every trailing dimension."""
    lam = pairs.lam.to(values.dtype).reshape(-1, *([1] * (values.ndim - 1)))
    return lam * values[pairs.first] + (1 - lam) * values[pairs.second]


class Mixup:
    """The Metrix step of one model: draws the pairs, embeds clean and mixed items, combines the two losses.

    Args:
        config: the recipe's ``mixup`` section.
        loss_fn: the model's metric loss; it must have a soft-label form (``SoftLabelLoss``).
        level: the label column whose classes decide positives and negatives (0 = finest).
        seed: the run's seed; with the step and ``stream`` it seeds each step's draws.
        stream: tells apart the draws of several models trained in one run (a cohort's model index).

    Raises:
        ConfigError: a loss without a soft-label form.
    """

    def __init__(self, config: MixupConfig, loss_fn: nn.Module, *, level: int, seed: int, stream: int = 0) -> None:
        if not isinstance(loss_fn, SoftLabelLoss):
            raise ConfigError(
                f"mixup: the loss ({type(loss_fn).__name__}) has no soft-label form for Metrix; use one of "
                + ", ".join(soft_label_losses())
            )
        self.config = config
        self.loss_fn = loss_fn
        self.level = level
        self.seed = seed
        self.stream = stream

    def pairs(self, labels: torch.Tensor, step: int) -> MixingPairs | None:
        """The step's mixing pairs (a function of ``seed``, ``step``, ``stream`` and the labels only)."""
        classes = labels[:, self.level] if labels.ndim == 2 else labels
        rng = np.random.default_rng([self.seed, step, self.stream, 0x4D495854])  # "MIXT": apart from other draws
        return draw_mixing_pairs(classes, self.config.alpha, rng)

    def embed(
        self, encoder: Encoder, images: torch.Tensor, pairs: MixingPairs | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(clean embeddings (N, D), mixed embeddings (M, D) or None)``, float32, of one encoder forward.

        Under ``torchrun`` ``images`` is this rank's slice and both returned tensors are the global batch's. The
        pairs index the global batch, so a mixed item may need two ranks' images: ``embedding`` mixup mixes the
        gathered embeddings; ``input`` mixup gathers the images (constants: no gradient), mixes this rank's
        :func:`~training.distributed.share` of the pairs and embeds them in one pass with its own images
        (BatchNorm sees clean and mixed items together, as in one process); ``feature`` mixup gathers the
        feature maps with :func:`~training.distributed.gather_shared` (a row's gradient comes from whichever
        ranks mixed it) and embeds its share of the mixed maps. The mixed shares are gathered in rank order,
        which restores the pairs' order. In one process every gather is the tensor itself and the share is
        every pair.
        """
        kind = self.config.kind
        if pairs is None or kind == "embedding":
            clean = gather_embeddings(encoder(images).float())
            return clean, None if pairs is None else F.normalize(mix(clean, pairs), dim=-1)
        current = world()
        mine = share(len(pairs), current.rank, current.size)
        part = MixingPairs(
            anchors=pairs.anchors[mine], first=pairs.first[mine], second=pairs.second[mine], lam=pairs.lam[mine]
        )
        if kind == "input":
            both = encoder(torch.cat([images, mix(gather_tensor(images), part)]))
            clean_local, mixed_local = both[: len(images)], both[len(images) :]
        else:
            features = encoder.feature_map(images)
            clean_local = encoder.embed_feature_map(features)
            mixed_local = encoder.embed_feature_map(mix(gather_shared(features), part))
        return gather_embeddings(clean_local.float()), gather_embeddings(mixed_local.float())

    def loss(
        self,
        clean: torch.Tensor,
        labels: torch.Tensor,
        mixed: torch.Tensor | None,
        pairs: MixingPairs | None,
    ) -> torch.Tensor:
        """``loss(clean, labels) + weight * mixed_loss``; only the clean loss when nothing could be mixed."""
        loss = self.loss_fn(clean.float(), labels)
        if mixed is None or pairs is None:
            return loss
        mixed_loss = self.loss_fn.mixed_loss(clean.float(), labels, mixed.float(), pairs.labels(labels))
        return loss + self.config.weight * mixed_loss


def soft_label_losses() -> list[str]:
    """Names of the registered losses with a soft-label form (each built once on a toy size to ask)."""
    from training.losses import available_losses, create_loss, needs_hierarchy

    names = []
    for name in available_losses():
        if needs_hierarchy(name):
            continue
        try:
            if isinstance(create_loss(name, [2, 2, 2], 4), SoftLabelLoss):
                names.append(name)
        except Exception:  # a loss that needs parameters of its own is not one to suggest
            continue
    return names
