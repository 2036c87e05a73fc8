"""GLAM: global-local, spatial-channel attention on a CNN's last feature map (Song, Han, Avrithis, WACV 2022).

Four attention branches refine the backbone's feature map ``F`` (``c x h x w``) and two streams are fused:

- local stream:  ``F_c^l = F ⊙ A_c^l + F`` then ``F^l = F_c^l ⊙ A_s^l + F_c^l``;
- global stream: ``F_c^g = F ⊙ G_c + F`` then ``F^g = F_c^g ⊙ G_s + F_c^g``;
- fusion:        ``F^gl = w_l F^l + w_g F^g + w F`` with ``(w_l, w_g, w) = softmax(logits)``.

Every branch can be switched off, so each row of the paper's ablation is one config
(:data:`GLAM_ABLATIONS`); with all four off the module is the identity and holds no parameters.

No official code exists. Where the paper (and ``METHODS.md``) leaves a choice open, this module takes
the one below:

1. **Reduced width** ``c' = max(1, channels // reduction)`` with ``reduction = 8`` by default (2048 -> 256
   on ResNet101); the paper does not state ``c'``. The ``max`` keeps tiny test models valid.
2. **1-D convolutions** (local channel attention, global channel ``Q``/``K``) are single-channel
   ``Conv1d`` over the channel axis with an odd kernel ``channel_kernel`` (default 3), zero padding
   ``k // 2`` and no bias, as in ECA-Net. ``Q`` and ``K`` have separate weights but read the same pooled
   vector.
3. **Pooling** for the channel branches is a spatial mean over ``F`` (not an ``AvgPool2d`` with the map's
   size as kernel), so the module works at any ``h x w`` and exports with dynamic height and width.
4. **Sequential branches within a stream** (CBAM style): local spatial attention is computed from
   ``F_c^l`` and global spatial attention from ``F_c^g``, mirroring the formulas that apply them to those
   maps. When a stream's channel branch is off, its spatial branch reads ``F`` (``F_c = F``).
5. **Local spatial convolutions** have no BatchNorm and no ReLU between them (only the final sigmoid), so
   the output does not depend on the batch and train/eval modes agree; the 3x3 convolutions with dilation
   ``d`` use padding ``d``, keeping ``h x w`` for any size, including 1 x 1.
6. **Softmax axes**: both global attentions normalise over the *key* index, so each output channel
   (``G_c``) or position (``G_s``) is a convex combination of the values: for ``A = softmax(Kᵀ Q)`` with
   ``(Kᵀ Q)_{ij} = k_i q_j`` the sum over ``i`` is 1, and ``G = V A``. No ``1/sqrt(d)`` temperature is
   applied, as the paper writes none.
7. **Global channel value** is ``F`` itself (``hw x c``), with no projection; the optional residual of
   ``F_c^g = F ⊙ G_c (+F)`` is kept, matching the local stream.
8. **Global spatial output** ``G_s = V A`` (``c' x hw``) is mapped back to ``c`` channels by a 1x1
   convolution (with bias) and used as is, without a sigmoid, as the formula states.
9. **Fusion** covers only the streams that are present: ``F`` always, the local stream when either local
   branch is on, the global stream when either global branch is on. The logits start at zero, so the
   weights start equal (1/3 each with both streams). With every branch off there is nothing to fuse and
   ``forward`` returns its input unchanged (the paper's baseline row).
"""

from __future__ import annotations

import torch
from torch import nn

from models.registries import ATTENTION

__all__ = [
    "GLAM",
    "GLAM_ABLATIONS",
    "GlobalChannelAttention",
    "GlobalSpatialAttention",
    "LocalChannelAttention",
    "LocalSpatialAttention",
]

_BRANCHES = ("local_channel", "local_spatial", "global_channel", "global_spatial")


def _ablation(*enabled: str) -> dict[str, bool]:
    return {branch: branch in enabled for branch in _BRANCHES}


#: The paper's ablation rows, each a complete ``attention_params`` branch selection.
GLAM_ABLATIONS: dict[str, dict[str, bool]] = {
    "baseline": _ablation(),
    "local-channel": _ablation("local_channel"),
    "local-spatial": _ablation("local_spatial"),
    "local": _ablation("local_channel", "local_spatial"),
    "global-channel": _ablation("global_channel"),
    "global-spatial": _ablation("global_spatial"),
    "global": _ablation("global_channel", "global_spatial"),
    "global+local": _ablation(*_BRANCHES),
}


def _channel_conv(kernel: int) -> nn.Conv1d:
    """ECA-style 1-D convolution over the channel axis of a ``(N, 1, C)`` vector."""
    return nn.Conv1d(1, 1, kernel_size=kernel, padding=kernel // 2, bias=False)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean of ``(N, C, H, W)`` as ``(N, 1, C)``, the input of the 1-D channel convolutions."""
    return x.mean(dim=(-2, -1)).unsqueeze(1)


class LocalChannelAttention(nn.Module):
    """``A_c^l = sigmoid(conv1d_k(GAP(F)))``, one weight per channel (``N, C, 1, 1``)."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = _channel_conv(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pooled(x)).sigmoid().transpose(1, 2).unsqueeze(-1)


class LocalSpatialAttention(nn.Module):
    """``A_s^l`` (``N, 1, H, W``): 1x1 to ``c'``, dilated 3x3 convs (d = 1, 2, 3) beside it, 1x1 to one map, sigmoid.

    The dilated convolutions see growing neighbourhoods (3, 5 and 7 px) of the reduced map, so the
    attention at a position weighs local context at several extents.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, kernel_size=1)
        self.dilated = nn.ModuleList(
            nn.Conv2d(reduced, reduced, kernel_size=3, padding=d, dilation=d) for d in (1, 2, 3)
        )
        self.fuse = nn.Conv2d(4 * reduced, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)
        features = torch.cat([reduced, *(conv(reduced) for conv in self.dilated)], dim=1)
        return self.fuse(features).sigmoid()


class GlobalChannelAttention(nn.Module):
    """``G_c`` (``N, C, H, W``): every channel of ``F`` re-expressed as a softmax-weighted mix of all channels.

    ``Q`` and ``K`` (``1 x c``) come from the pooled vector through 1-D convolutions and a sigmoid;
    ``A = softmax(Kᵀ Q)`` (``c x c``, normalised over the key channel) and ``G_c = V A`` with ``V = F``
    as ``hw x c``.
    """

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.query = _channel_conv(kernel)
        self.key = _channel_conv(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _pooled(x)
        query = self.query(pooled).sigmoid()  # (N, 1, C)
        key = self.key(pooled).sigmoid()  # (N, 1, C)
        attention = torch.bmm(key.transpose(1, 2), query).softmax(dim=1)  # (N, C_key, C_query)
        mixed = torch.bmm(attention.transpose(1, 2), x.flatten(2))  # (N, C, HW) = (V A)ᵀ
        return mixed.view_as(x)


class GlobalSpatialAttention(nn.Module):
    """``G_s`` (``N, C, H, W``): non-local attention over all ``hw`` positions at width ``c'``.

    Memory is ``hw x hw`` per image: 256 x 256 for ResNet at 512 px, 1024 x 1024 at 1024 px.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, reduced, kernel_size=1)
        self.key = nn.Conv2d(channels, reduced, kernel_size=1)
        self.value = nn.Conv2d(channels, reduced, kernel_size=1)
        self.project = nn.Conv1d(reduced, channels, kernel_size=1)  # the 1x1 conv back to c, on the flat map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query(x).flatten(2)  # (N, c', HW)
        key = self.key(x).flatten(2)
        value = self.value(x).flatten(2)
        attention = torch.bmm(key.transpose(1, 2), query).softmax(dim=1)  # (N, HW_key, HW_query)
        return self.project(torch.bmm(value, attention)).view_as(x)


@ATTENTION.register("glam")
class GLAM(nn.Module):
    """Global-local attention in the encoder's attention slot; maps ``(N, C, H, W)`` to the same shape.

    Args:
        channels: ``C``, the backbone's feature channels.
        local_channel: use the local channel attention ``A_c^l``.
        local_spatial: use the local spatial attention ``A_s^l``.
        global_channel: use the global channel attention ``G_c``.
        global_spatial: use the global spatial attention ``G_s``.
        reduction: ``c' = max(1, channels // reduction)`` for the spatial branches (the paper leaves ``c'``
            open; 8 gives 256 on ResNet101).
        channel_kernel: odd kernel size of the 1-D channel convolutions (ECA uses 3).

    Raises:
        ValueError: a non-positive ``channels``/``reduction`` or an even/non-positive ``channel_kernel``.
    """

    def __init__(
        self,
        channels: int,
        *,
        local_channel: bool = True,
        local_spatial: bool = True,
        global_channel: bool = True,
        global_spatial: bool = True,
        reduction: int = 8,
        channel_kernel: int = 3,
    ) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"GLAM needs channels >= 1 and reduction >= 1, got {channels} and {reduction}")
        if channel_kernel < 1 or channel_kernel % 2 == 0:
            raise ValueError(f"GLAM channel_kernel must be a positive odd number, got {channel_kernel}")
        self.channels = channels
        self.reduced = max(1, channels // reduction)
        self.channel_kernel = channel_kernel
        self.local_channel = LocalChannelAttention(channel_kernel) if local_channel else None
        self.local_spatial = LocalSpatialAttention(channels, self.reduced) if local_spatial else None
        self.global_channel = GlobalChannelAttention(channel_kernel) if global_channel else None
        self.global_spatial = GlobalSpatialAttention(channels, self.reduced) if global_spatial else None
        self.has_local = local_channel or local_spatial
        self.has_global = global_channel or global_spatial
        num_streams = 1 + int(self.has_local) + int(self.has_global)
        # Logits of the fusion weights over (local, global, original), present streams only; zeros = equal.
        self.fusion_logits = nn.Parameter(torch.zeros(num_streams)) if num_streams > 1 else None

    @property
    def fusion_weights(self) -> torch.Tensor:
        """The softmax-normalised fusion weights in the order (local, global, original), present streams only."""
        if self.fusion_logits is None:
            return torch.ones(1)
        return self.fusion_logits.softmax(dim=0)

    def local_stream(self, x: torch.Tensor) -> torch.Tensor:
        """``F^l``: local channel then local spatial attention, each with its residual."""
        if self.local_channel is not None:
            x = x * self.local_channel(x) + x
        if self.local_spatial is not None:
            x = x * self.local_spatial(x) + x
        return x

    def global_stream(self, x: torch.Tensor) -> torch.Tensor:
        """``F^g``: global channel then global spatial attention, each with its residual."""
        if self.global_channel is not None:
            x = x * self.global_channel(x) + x
        if self.global_spatial is not None:
            x = x * self.global_spatial(x) + x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusion_logits is None:
            return x
        streams = []
        if self.has_local:
            streams.append(self.local_stream(x))
        if self.has_global:
            streams.append(self.global_stream(x))
        streams.append(x)
        weights = self.fusion_logits.softmax(dim=0).to(x.dtype)
        out = weights[0] * streams[0]
        for i in range(1, len(streams)):  # index, not iterate, the weights: tensor iteration breaks tracing
            out = out + weights[i] * streams[i]
        return out

    def extra_repr(self) -> str:
        enabled = [b for b in _BRANCHES if getattr(self, b) is not None] or ["none"]
        return f"channels={self.channels}, reduced={self.reduced}, branches={'+'.join(enabled)}"
