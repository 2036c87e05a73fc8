"""Global pooling of a feature map into one vector per image.

GeM is written as a mean over the spatial axes rather than an ``avg_pool2d`` whose
kernel is taken from the input's shape: the latter exports to ONNX with the kernel
size of the export image baked in, and then gives silently wrong vectors at any
other image size.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registries import POOLING

__all__ = ["GeM", "GlobalAvgPool", "GlobalMaxPool"]


@POOLING.register("gem")
class GeM(nn.Module):
    """Generalised-mean pooling ``(mean_{h,w} clamp(x, eps)^p)^(1/p)`` with a learnable ``p``.

    ``p = 1`` is average pooling and ``p -> inf`` approaches max pooling; learning ``p``
    lets the network choose how peaked its spatial aggregation is (Radenović et al.).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.eps = eps
        p_tensor = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


@POOLING.register("avg")
class GlobalAvgPool(nn.Module):
    """Average over the spatial axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


@POOLING.register("max")
class GlobalMaxPool(nn.Module):
    """Maximum over the spatial axes (MAC)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))
