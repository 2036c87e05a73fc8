"""Training under ``torchrun``: one global batch, sliced across processes, with the update of one process.

``torchrun --nproc-per-node N -m retrieval.cli.main train --config RECIPE`` starts ``N`` copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment.
:func:`setup` reads them and joins the process group (NCCL on CUDA, gloo on CPU); without them, or with
``WORLD_SIZE=1``, nothing is initialised and the run is the single-process one, unchanged.

Why the update equals one process taking the whole global batch:

* **Same batch everywhere.** The batch stream is a pure function of ``(seed, step)`` (``training.batches``), so
  every rank draws the same global batch of ``B`` images and loads only its slice ``[r B/W, (r+1) B/W)``
  (:func:`shard_keys`; ``B`` must be divisible by ``W``). Labels and dataset positions are gathered
  (:func:`gather_tensor`) so every rank holds the global ones.
* **Same loss everywhere.** Rank ``r`` embeds its slice ``E_r``; :func:`gather_embeddings` returns the global
  ``E = [E_0; ...; E_{W-1}]`` with the gradient flowing into the local slot only. Every rank then computes the
  loss ``L(E, labels)`` of the whole batch (mining, CSL, the DM² relation matrix, Metrix pairs all see every
  pair), bit-for-bit the same value on every rank.
* **Encoder gradients are summed.** By the chain rule ``dL/dtheta = sum_r dL/dE_r . dE_r/dtheta``; rank ``r``'s
  backward computes exactly term ``r`` (the complete ``dL/dE_r``, because it evaluated the complete ``L``), so
  the gradient of the encoders is the **sum** over ranks, not the mean ``DistributedDataParallel`` would take.
* **Loss parameters are averaged.** Proxies (ArcFace weights, Proxy Anchor's proxies) enter ``L`` directly;
  every rank computes their full gradient from the gathered batch, so those gradients are already complete and
  identical: they are **averaged** (a no-op up to rounding that keeps the ranks in lockstep).

:func:`sync_gradients` does both in one all-reduce per bucket after ``backward`` (no overlap with the backward
pass: one all-reduce of the model's size per step). Every rank then takes the same AdamW step and stays
identical, so a checkpoint holds nothing rank-specific and a run may resume on another number of processes.

**BatchNorm.** A rank normalises its slice with the slice's statistics, not the global batch's, unless its
BatchNorm layers are synchronised: ``training.sync_batchnorm`` does that (``torch.nn.SyncBatchNorm`` on CUDA, an
all-reduce of per-channel sums on CPU, where torch's refuses to run).

**Work shared out after the gather.** Metrix ``input`` and ``feature`` mixup mix images or feature maps of any
two images of the batch: the ranks gather them, each embeds its :func:`share` of the mixed items, and the mixed
embeddings are gathered like the clean ones. Images need no gradient; feature maps are gathered with
:func:`gather_shared`, whose backward sums each row's gradient over the ranks that mixed it.

What still differs from one process: dropout masks (each rank draws its own for its rows) and float rounding
(sums taken in another order), which sampling losses (distance-weighted triplets draw from a distribution of
the distances) can turn into a different draw.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from retrieval.config import ConfigError

__all__ = [
    "World",
    "agree",
    "barrier",
    "broadcast_object",
    "check_batch_divisible",
    "gather_embeddings",
    "gather_shared",
    "gather_tensor",
    "is_main_process",
    "main_process_first",
    "setup",
    "shard_keys",
    "share",
    "sync_gradients",
    "teardown",
    "world",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits at a collective: rank 0 alone evaluates and writes checkpoints while the others wait,
#: which may take longer than the NCCL default of 10 minutes on a large validation set.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
#: Gradients are all-reduced in flat buckets of at most this many elements (bounds the extra memory).
BUCKET_ELEMENTS = 1 << 24

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (``rank 0 of 1`` without ``torchrun``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and metrics, evaluates and draws progress."""
        return self.rank == 0


def _env_world() -> World:
    """The world ``torchrun`` describes in the environment (one process when it describes none)."""
    present = [name for name in _ENV if name in os.environ]
    if not present:
        return World()
    if len(present) != len(_ENV):
        missing = ", ".join(name for name in _ENV if name not in os.environ)
        raise ConfigError(
            f"a distributed run needs RANK, WORLD_SIZE and LOCAL_RANK; {missing} is not set (use torchrun)"
        )
    try:
        rank, size, local_rank = (int(os.environ[name]) for name in _ENV)
    except ValueError:
        values = ", ".join(f"{name}={os.environ[name]!r}" for name in _ENV)
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {values}") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}")
    return World(rank, size, local_rank)


def world() -> World:
    """The current world: the initialised process group's, else what the environment says (no group: one
    process, or a ``torchrun`` run before :func:`setup` / after :func:`teardown`)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_world().local_rank)
    return World()


def is_main_process() -> bool:
    """Whether this process writes the run's files and output: rank 0, or the only process.

    Also right after :func:`teardown` (it falls back to ``RANK``), so a command prints its summary once.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up for this process (idempotent) and pick the rank's device.

    NCCL for a CUDA ``device`` (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Without a ``torchrun``
    environment, or with ``WORLD_SIZE=1``, nothing is initialised and ``device`` is returned as it is. The group
    is destroyed by :func:`teardown`, at the latest when the interpreter exits.

    Raises:
        ConfigError: a partial or inconsistent torchrun environment, or fewer visible GPUs than local ranks.
    """
    env = _env_world()
    if not env.distributed:
        return env, device
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {env.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
        atexit.register(teardown)
        logger.info("rank %d of %d joined the %s process group on %s", env.rank, env.size, backend, device)
    return world(), device


def teardown() -> None:
    """Leave the process group, if this process joined one (idempotent).

    No barrier first: ``Trainer.fit`` ends with a collective after rank 0's last write, and after a failure a
    barrier would wait for peers stuck elsewhere (torchrun stops them once this process exits).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if world().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the others: for work whose result rank 0 writes to disk once (a
    teacher's embedding cache) and the others then read."""
    current = world()
    if current.distributed and not current.is_main:
        dist.barrier()
    yield
    if current.distributed and current.is_main:
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object; for decisions taken once, as a fitted schedule)."""
    if not world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: a decision that depends on a clock (stop for the time budget) must be
    taken once, or the ranks would part ways and wait forever in different collectives."""
    if not world().distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


# ---------------------------------------------------------------------------------------------- the batch


def check_batch_divisible(batch_size: int, world_size: int) -> None:
    """Refuse a global batch the ranks cannot share equally.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if world_size > 1 and batch_size % world_size:
        raise ConfigError(
            f"the global batch of {batch_size} images cannot be split evenly over {world_size} processes; "
            f"choose a batch size (sampler.classes_per_batch x sampler.images_per_class, or sampler.batch_size) "
            f"divisible by {world_size}, or run another number of processes"
        )


def shard_keys(batches: Iterable[Sequence[T]], rank: int, world_size: int) -> Iterator[list[T]]:
    """This rank's slice of every global batch: items ``[rank * B/W, (rank + 1) * B/W)``.

    Contiguous slices, so gathering the ranks' pieces in rank order restores the global batch's order.
    """
    for batch in batches:
        check_batch_divisible(len(batch), world_size)
        share = len(batch) // world_size
        yield list(batch[rank * share : (rank + 1) * share])


def gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, without gradient (labels, positions).

    Pieces may differ in length along dim 0 (the rest of the shape must match).
    """
    current = world()
    if not current.distributed:
        return tensor
    return torch.cat(_all_gather_uneven(tensor.detach().contiguous(), current.size))


def gather_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """The global batch's embeddings from every rank's slice, differentiable in the local slot.

    ``(sum_r N_r, D)`` in rank order; in one process, ``embeddings`` itself. The backward pass hands this rank
    the gradient of its own rows and drops the others': every rank evaluates the same loss on the same gathered
    tensor, so rank ``r`` already holds the complete ``dL/dE_r`` and the owners of the other rows compute theirs
    (see the module docstring for why the encoders' gradients are then summed across ranks).
    """
    current = world()
    if not current.distributed:
        return embeddings
    return _GatherLocalSlot.apply(embeddings.contiguous())


class _GatherLocalSlot(torch.autograd.Function):
    """All ranks' rows in rank order; the backward pass hands each rank the gradient of its own rows."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        pieces = _all_gather_uneven(local, dist.get_world_size())
        rank = dist.get_rank()
        start = sum(len(piece) for piece in pieces[:rank])
        ctx.slot = (start, start + len(local))
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        start, stop = ctx.slot
        return grad[start:stop]


def gather_shared(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` concatenated in rank order, for work the ranks then *share out* rather than repeat.

    Unlike :func:`gather_embeddings`, the backward pass sums the gathered tensor's gradient over the ranks before
    handing each rank its slot: use it where each rank computes a different part of the loss's inputs from the
    whole gathered tensor (Metrix feature mixup: rank ``r`` mixes its share of the pairs, whose maps come from
    any rank), so the gradient of a rank's rows is spread over the ranks that used them.
    """
    current = world()
    if not current.distributed:
        return local
    return _GatherSummedGrad.apply(local.contiguous())


def share(count: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` rows (the first ``count % world_size`` ranks get one more)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class _GatherSummedGrad(_GatherLocalSlot):
    """The same gather; the backward pass first sums the gradient over the ranks (see ``gather_shared``)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start, stop = ctx.slot
        return total[start:stop]


def _all_gather_uneven(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """``all_gather`` of tensors whose first dimensions may differ: lengths first, then padded pieces."""
    length = torch.tensor([len(tensor)], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    padded = tensor
    if len(tensor) < longest:
        padding = tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))
        padded = torch.cat([tensor, padding])
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded)
    return [piece[:size] for piece, size in zip(pieces, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------- gradients


def sync_gradients(summed: Iterable[nn.Parameter], averaged: Iterable[nn.Parameter]) -> None:
    """Make every rank's gradients those of one process on the global batch (see the module docstring).

    Args:
        summed: parameters that see the batch only through this rank's rows (the encoders): summed.
        averaged: parameters every rank differentiates in full on the gathered batch (loss proxies): averaged.

    Parameters without a gradient are skipped; every rank runs the same graph, so they are the same ones
    everywhere (a DM² model that skips a step has none on any rank).
    """
    current = world()
    if not current.distributed:
        return
    entries = [(p.grad, 1.0) for p in summed if p.grad is not None]
    entries += [(p.grad, 1.0 / current.size) for p in averaged if p.grad is not None]
    by_kind: dict[tuple[torch.dtype, torch.device], list[tuple[torch.Tensor, float]]] = {}
    for grad, scale in entries:
        by_kind.setdefault((grad.dtype, grad.device), []).append((grad, scale))
    for group in by_kind.values():
        for bucket in _buckets(group):
            flat = torch.cat([grad.reshape(-1) for grad, _ in bucket])
            dist.all_reduce(flat)
            offset = 0
            for grad, scale in bucket:
                count = grad.numel()
                piece = flat[offset : offset + count].view_as(grad)
                grad.copy_(piece if scale == 1.0 else piece * scale)
                offset += count


def _buckets(entries: list[tuple[torch.Tensor, float]]) -> Iterator[list[tuple[torch.Tensor, float]]]:
    bucket: list[tuple[torch.Tensor, float]] = []
    size = 0
    for entry in entries:
        if bucket and size + entry[0].numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += entry[0].numel()
    if bucket:
        yield bucket
