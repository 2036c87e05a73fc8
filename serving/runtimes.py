"""Query-encoder runtimes: the same ``encode(images)`` over a PyTorch checkpoint or an ONNX file.

A query encoder only has to turn query images into vectors in the index's space; whether it
runs in PyTorch or ONNX Runtime is a deployment choice. Both runtimes take their
preprocessing from the artifact itself (the checkpoint's config, the ONNX file's metadata)
and never from the caller, so a query is always prepared exactly like the gallery was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.data.transforms import PreprocessConfig, build_transforms
from retrieval.errors import UserFacingError
from retrieval.registry import Registry

__all__ = [
    "RUNTIMES",
    "OnnxRuntimeQueryEncoder",
    "QueryEncoder",
    "QueryEncoderError",
    "TorchQueryEncoder",
    "open_query_encoder",
]

logger = logging.getLogger(__name__)

#: Images per forward pass inside ``encode``; bounds memory for long query lists.
DEFAULT_BATCH_SIZE = 32


class QueryEncoderError(UserFacingError, ValueError):
    """A query-encoder path that does not exist or that no runtime can open; the message names it."""


@runtime_checkable
class QueryEncoder(Protocol):
    """What the search engine needs from a query encoder.

    Attributes:
        encoder_id: id of the weights (an index accepts its own encoder id).
        teacher_id: id of the teacher a distilled student lands on (an index built by that teacher accepts it).
        dim: embedding dimension.
        preprocess: how images are prepared before the network.
    """

    encoder_id: str
    teacher_id: str | None
    dim: int
    preprocess: PreprocessConfig

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        ...


#: ``name -> opener(path, **options) -> QueryEncoder``.
RUNTIMES: Registry[Callable[..., QueryEncoder]] = Registry("runtime")


class _PreprocessingEncoder:
    """Shared part of the runtimes: PIL images -> normalised ``(N, 3, S, S)`` float32 batches."""

    encoder_id: str
    teacher_id: str | None
    dim: int

    def __init__(self, preprocess: PreprocessConfig, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.preprocess = preprocess
        self.batch_size = batch_size
        self._transform = build_transforms(preprocess, train=False)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        import torch

        images = list(images)
        chunks = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self._transform(image) for image in images[start : start + self.batch_size]])
            chunks.append(np.asarray(self._embed(batch), dtype=np.float32))
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)

    def _embed(self, batch: Any) -> np.ndarray:
        raise NotImplementedError


@RUNTIMES.register("torch")
class TorchQueryEncoder(_PreprocessingEncoder):
    """A checkpoint directory run in PyTorch.

    Args:
        path: an encoder checkpoint directory (``models.save_encoder``).
        device: where to run; defaults to CUDA when available, else CPU.
        batch_size: images per forward pass.

    Raises:
        models.CheckpointError: not a valid checkpoint.
    """

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        from models.checkpoint import load_encoder
        from models.devices import resolve_device

        self.path = Path(path)
        self.device = resolve_device(device or "auto")
        self.encoder = load_encoder(self.path, device=self.device)
        config = self.encoder.config
        self.encoder_id = str(self.encoder.encoder_id)
        self.teacher_id = config.teacher_id
        self.dim = int(config.embedding_dim)
        super().__init__(config.preprocess, batch_size)

    def _embed(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.encoder(batch.to(self.device)).float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchQueryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r}, device={str(self.device)!r})"


@RUNTIMES.register("onnxruntime")
class OnnxRuntimeQueryEncoder(_PreprocessingEncoder):
    """An ``.onnx`` file from ``serving.export.export_onnx`` run in ONNX Runtime.

    Preprocessing is rebuilt from the file's metadata. The CUDA execution provider is used when
    the installed ONNX Runtime offers it, with the CPU provider as fallback.

    Args:
        path: the exported ``.onnx`` file.
        providers: ONNX Runtime execution providers, in order of preference (default: CUDA if
            available, then CPU).
        batch_size: images per ``session.run``.

    Raises:
        QueryEncoderError: missing file, or a file ONNX Runtime cannot load.
        serving.onnx_metadata.OnnxMetadataError: no valid query-encoder metadata in the file.
    """

    def __init__(
        self, path: str | Path, providers: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        import onnxruntime as ort

        from serving.onnx_metadata import parse_onnx_metadata

        self.path = Path(path)
        if not self.path.is_file():
            raise QueryEncoderError(f"ONNX query encoder not found: {self.path}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own InvalidProtobuf/Fail types
            raise QueryEncoderError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        info = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.info = info
        self.encoder_id = info.encoder_id
        self.teacher_id = info.teacher_id
        self.dim = info.embedding_dim
        self._input_name = self.session.get_inputs()[0].name
        super().__init__(info.preprocess, batch_size)
        logger.info("ONNX query encoder %s on %s", self.path, ", ".join(self.session.get_providers()))

    def _embed(self, batch: Any) -> np.ndarray:
        return self.session.run(None, {self._input_name: batch.numpy()})[0]

    def __repr__(self) -> str:
        return f"OnnxRuntimeQueryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r})"


def open_query_encoder(path: str | Path, runtime: str | None = None, **options: Any) -> QueryEncoder:
    """Open a query encoder, choosing the runtime from the path unless one is named.

    A directory opens as a PyTorch checkpoint (``"torch"``), a ``.onnx`` file with ONNX Runtime
    (``"onnxruntime"``).

    Args:
        path: a checkpoint directory or an ``.onnx`` file.
        runtime: a name in ``RUNTIMES`` to force a runtime.
        options: passed to the runtime (``device``, ``providers``, ``batch_size``).

    Raises:
        QueryEncoderError: the path does not exist or is neither a directory nor an ``.onnx`` file.
        retrieval.registry.UnknownNameError: an unknown ``runtime`` name.
    """
    path = Path(path)
    if runtime is None:
        if not path.exists():
            raise QueryEncoderError(f"query encoder not found: {path}")
        if path.is_dir():
            runtime = "torch"
        elif path.suffix.lower() == ".onnx":
            runtime = "onnxruntime"
        else:
            raise QueryEncoderError(
                f"cannot tell how to open query encoder {path}: expected an encoder checkpoint directory "
                f"(runtime 'torch') or an .onnx file (runtime 'onnxruntime'); valid runtimes: "
                f"{', '.join(RUNTIMES.names())}"
            )
    return RUNTIMES.get(runtime)(path, **options)
