"""Embed a labelled dataset with an encoder, in eval mode and with that encoder's own evaluation transform.

Shared by the trainer's validation and by objectives that need a frozen model's view of the training data
(the distillation teacher's embeddings). ``training`` may not import ``indexing`` (whose extraction adds
resumable chunks and skip reports a training run does not need), so this is the training side's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.encoder import Encoder, eval_mode
from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.transforms import build_transforms

__all__ = ["embed_dataset"]


@torch.no_grad()
def embed_dataset(
    encoder: Encoder,
    dataset: LabelledImageDataset,
    *,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: str | None = None,
) -> np.ndarray:
    """``(N, D)`` float32 L2-normalised embeddings of ``dataset`` in its order.

    Args:
        encoder: the model; its ``config.preprocess`` decides the input size and normalisation.
        dataset: the images (its own transform is replaced by the encoder's evaluation transform).
        device: where the encoder runs (the batches are moved there).
        batch_size, num_workers: DataLoader settings.
        autocast: a context for the forward passes (mixed precision on CUDA).
        progress: a label for a progress bar on stderr, or ``None`` for none.
    """
    view = dataset.with_transform(build_transforms(encoder.config.preprocess, train=False))
    loader = DataLoader(
        view,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # never draw from the global RNG (it belongs to training)
    )
    chunks = [torch.zeros((0, encoder.embedding_dim))]
    with eval_mode(encoder), _bar(progress, len(dataset)) as advance:
        for images, _labels in loader:
            with autocast():
                out = encoder(images.to(device, non_blocking=True))
            chunks.append(F.normalize(out.float(), dim=-1).cpu())
            advance(len(images))
    return torch.cat(chunks).numpy()


@contextlib.contextmanager
def _bar(label: str | None, total: int):  # type: ignore[no-untyped-def]
    if label is None:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
