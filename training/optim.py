"""AdamW with parameter groups, and a linear warm-up + cosine learning-rate schedule.

Three kinds of parameters need different treatment: weight matrices and convolution kernels get
weight decay; biases, normalisation scales and loss proxies do not (decaying them only fights the
normalisation, since the output is invariant to their scale); GeM's exponent ``p`` is a single scalar
that moves too slowly at the network's learning rate, so it gets a multiple of it (the reference
retrieval code uses 10x) and no decay, which would pull it towards average pooling.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from training.config import OptimConfig, ScheduleConfig

__all__ = ["WarmupCosine", "adamw", "build_optimizer", "build_scheduler", "param_groups", "warmup_cosine"]


def param_groups(encoder: nn.Module, loss: nn.Module | None, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into named AdamW groups: ``decay``, ``no_decay``, ``gem_p``, ``loss``.

    Empty groups are left out. Each group carries a ``name`` key so logs and tests can find it.
    """
    gem_p = _gem_exponents(encoder)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in encoder.parameters():
        if not param.requires_grad or id(param) in gem_p:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {
            "name": "gem_p",
            "params": [p for p in encoder.parameters() if id(p) in gem_p and p.requires_grad],
            "lr": cfg.lr * cfg.gem_p_lr_mult,
            "weight_decay": 0.0,
        },
    ]
    if loss is not None:
        loss_params = [p for p in loss.parameters() if p.requires_grad]
        groups.append({"name": "loss", "params": loss_params, "lr": cfg.lr * cfg.loss_lr_mult, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def _gem_exponents(encoder: nn.Module) -> set[int]:
    # The encoder's pooling module names its learnable exponent ``p`` (models.pooling.GeM).
    pooling = getattr(encoder, "pooling", None)
    if pooling is None:
        return set()
    return {id(param) for name, param in pooling.named_parameters() if name.split(".")[-1] == "p"}


def build_optimizer(encoder: nn.Module, loss: nn.Module | None, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (decoupled weight decay, per-group learning rates)."""
    return adamw(param_groups(encoder, loss, cfg), cfg)


def adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ready-made parameter groups (a training objective's ``param_groups``)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, final_ratio: float = 0.0) -> float:
    """Learning-rate multiplier for the 0-based optimiser step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so the very
    first update is already non-zero), then a half cosine from 1 down towards ``final_ratio`` at
    ``max_steps``. Warm-up matters for training from scratch with AdamW: the second-moment estimates
    are poor for the first few hundred updates, and large steps then can wreck the BatchNorm statistics.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable callable form of :func:`warmup_cosine` for ``LambdaLR``.

    Its attributes are plain numbers, so ``LambdaLR.state_dict()`` (which stores a callable object's
    ``__dict__``) stays loadable with ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int, max_steps: int, final_ratio: float = 0.0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.final_ratio = float(final_ratio)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.max_steps, self.final_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> LambdaLR:
    """A per-step ``LambdaLR`` applying :class:`WarmupCosine` to every parameter group's own base rate."""
    return LambdaLR(optimizer, WarmupCosine(cfg.resolved_warmup_steps(), cfg.max_steps, cfg.final_lr_ratio))
