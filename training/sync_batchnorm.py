"""BatchNorm over the global batch under ``torchrun``: each rank normalises with every rank's statistics.

Why: under ``torchrun`` a rank embeds only its slice of the global batch (``training.distributed``), and a
BatchNorm layer in training mode would normalise that slice with the slice's own mean and variance. The
activations, the loss and the running averages would then differ from one process taking the whole batch, and
the update would no longer be the single-process one. :func:`sync_batchnorm` makes the layers use the global
batch's statistics when ``W > 1``:

* on CUDA, ``torch.nn.SyncBatchNorm`` (through timm's ``convert_sync_batchnorm``, which keeps timm's fused
  BatchNorm + activation fused);
* on CPU, torch's ``SyncBatchNorm`` cannot be used: it supports GPU inputs only and refuses to run on CPU
  tensors, so gloo runs (and the tests, which launch two CPU processes) would fail. Instead
  :class:`AllReduceBatchNorm` all-reduces the per-channel sums, differentiably (:func:`all_reduce_sum`), to the
  same effect: training statistics are those of the global batch, the gradient through them reaches every
  rank's inputs, and the running averages move as in one process.

In eval mode, or in one process, the layers are plain BatchNorm: the same parameters and buffers, so
checkpoints and the encoders rebuilt from them are unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.distributed import world

__all__ = ["AllReduceBatchNorm", "all_reduce_sum", "sync_batchnorm"]

logger = logging.getLogger(__name__)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its BatchNorm layers synchronised across ranks (unchanged in one process).

    On CUDA, timm's ``convert_sync_batchnorm`` (``torch.nn.SyncBatchNorm``, and timm's fused BatchNorm +
    activation kept fused). Elsewhere torch's refuses to run (it supports GPU inputs only), so 2-D BatchNorm
    layers become :class:`AllReduceBatchNorm` (or its fused timm form) in place: the class of the layer object
    changes, its parameters and buffers stay the same objects, so an optimiser built before still holds them.
    """
    if not world().distributed:
        return module
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    from timm.layers import BatchNormAct2d

    fused = _batchnorm_act_class()
    for layer in module.modules():
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = AllReduceBatchNorm
        elif type(layer) is BatchNormAct2d:
            layer.__class__ = fused
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, (AllReduceBatchNorm, fused)):
            logger.warning("%s keeps per-rank statistics under torchrun on CPU", type(layer).__name__)
    return module


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d normalising with the global batch's statistics on any backend (gloo on CPU too).

    In eval mode, or in one process, it is plain BatchNorm2d: same parameters and buffers, so checkpoints and
    the encoder rebuilt from them are unchanged.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and world().distributed:
            return _global_batch_norm(self, input)
        return super().forward(input)


@functools.cache
def _batchnorm_act_class() -> type[nn.Module]:
    """timm's fused BatchNorm + activation (EfficientNet's), synchronised like :class:`AllReduceBatchNorm`."""
    from timm.layers import BatchNormAct2d

    class AllReduceBatchNormAct(BatchNormAct2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and world().distributed:
                return self.act(self.drop(_global_batch_norm(self, x)))
            return super().forward(x)

    return AllReduceBatchNormAct


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of ``input`` (N, C, H, W) with the statistics of every rank's rows together.

    Two differentiable all-reduces (:func:`all_reduce_sum`, whose backward sums the ranks' gradients): the
    per-channel sums and counts give the global mean, then the sums of squared deviations from it give the
    variance (two passes, as one process computes it: ``E[x^2] - E[x]^2`` loses digits in float32). The mean, the
    biased variance used to normalise and the unbiased one folded into the running average are the global batch's,
    and the gradient through the statistics reaches every rank's inputs.
    """
    if input.ndim != 4:
        raise ValueError(f"expected a 4-D input to a 2-D BatchNorm, got {input.ndim}-D")
    x = input.float()
    channels = x.shape[1]
    count = torch.full((1,), float(x.numel() // channels), device=x.device)
    sums = all_reduce_sum(torch.cat([x.sum((0, 2, 3)), count]))
    n = sums[-1]
    mean = sums[:channels] / n
    centred = x - mean.view(1, channels, 1, 1)
    var = all_reduce_sum(centred.pow(2).sum((0, 2, 3))) / n
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    shape = (1, channels, 1, 1)
    out = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out.to(input.dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every rank, differentiable: the backward pass sums the ranks' gradients too
    (each rank's loss depends on the sum through its own rows only). The identity in one process."""
    if not world().distributed:
        return tensor
    return _AllReduceSum.apply(tensor)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.detach().clone().contiguous()
        dist.all_reduce(total)
        return total
