"""The PyTorch query encoder: an encoder checkpoint directory, run with the torch preprocessing pipeline.

Torch is imported when a checkpoint is opened, never when this module is imported or when
``reject_reason`` probes a path: selecting a runtime for an ONNX file must not cost the torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.runtimes.base import DEFAULT_BATCH_SIZE, RUNTIMES, QueryEncoderRuntime, check_batch_size

__all__ = ["CHECKPOINT_FILES", "TorchQueryEncoder"]

#: The files of a checkpoint directory (``models.checkpoint.CONFIG_FILE`` and ``WEIGHTS_FILE``), repeated here
#: because importing ``models.checkpoint`` imports torch; a test keeps the two in step.
CHECKPOINT_FILES = ("config.json", "model.safetensors")


@RUNTIMES.register("torch")
class TorchQueryEncoder(QueryEncoderRuntime):
    """A checkpoint directory run in PyTorch.

    Args:
        path: an encoder checkpoint directory (``models.save_encoder``).
        device: where to run; defaults to CUDA when available, else CPU.
        batch_size: images per forward pass.

    Raises:
        models.CheckpointError: not a valid checkpoint.
    """

    expects = f"an encoder checkpoint directory ({' + '.join(CHECKPOINT_FILES)})"

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        from models.checkpoint import load_encoder
        from models.devices import resolve_device
        from retrieval.data.transforms import build_transforms

        self.path = Path(path)
        self.batch_size = check_batch_size(batch_size)
        self.device = resolve_device(device or "auto")
        self.encoder = load_encoder(self.path, device=self.device)
        config = self.encoder.config
        self.encoder_id = str(self.encoder.encoder_id)
        self.teacher_id = config.teacher_id
        self.dim = int(config.embedding_dim)
        self.preprocess = config.preprocess
        self._transform = build_transforms(self.preprocess, train=False)

    @classmethod
    def reject_reason(cls, path: Path) -> str | None:
        """``None`` for a directory holding the checkpoint files (checked by name only: no torch import)."""
        if not path.is_dir():
            return "not a directory"
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        return f"the directory lacks {', '.join(missing)}" if missing else None

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        images = list(images)
        parts = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            parts.append(self.infer(self.prepare(images[start : start + self.batch_size])))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def prepare(self, images: Sequence[Image.Image]) -> Any:
        """The ``(N, 3, S, S)`` float tensor of one forward pass, by the torch preprocessing pipeline.

        ``encode`` is ``prepare`` then ``infer`` per batch; apart so that ``benchmarks/bench_query_stages.py``
        can time the preprocessing and the network separately.
        """
        import torch

        return torch.stack([self._transform(image) for image in images])

    def infer(self, batch: Any) -> np.ndarray:
        """The embeddings of a ``prepare``d batch as ``(N, dim)`` float32."""
        import torch

        with torch.inference_mode():
            return self.encoder(batch.to(self.device)).float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchQueryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r}, device={str(self.device)!r})"
