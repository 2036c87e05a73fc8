"""The TensorRT query encoder: a serialised engine built ahead of time, run on a CUDA device.

An engine is the fastest query path on an NVIDIA GPU, but it is opaque and tied to the TensorRT version
and GPU that built it; its JSON sidecar (``serving.runtimes.tensorrt_sidecar``) says which encoder it is,
how to prepare its input and which batch sizes it takes. Preprocessing is the numpy one shared with ONNX
Runtime; device buffers are torch CUDA tensors (torch is installed on GPU servers anyway, and it saves a
second CUDA binding such as cuda-python or pycuda). Uses the TensorRT 10+ name-based tensor API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.runtimes.base import DEFAULT_BATCH_SIZE, RUNTIMES, QueryEncoderError, QueryEncoderRuntime, check_batch_size
from serving.runtimes.numpy_batches import chunks, finish_embeddings, model_inputs, pad_batch
from serving.runtimes.tensorrt_sidecar import (
    TensorRTEngineInfo,
    TensorRTSidecarError,
    read_engine_sidecar,
    sidecar_path,
    verify_engine_file,
)

__all__ = ["TensorRTQueryEncoder", "tensorrt_problems"]

logger = logging.getLogger(__name__)

_HOW_TO_GET_IT = (
    'install it on a GPU machine with `pip install -e ".[tensorrt]"` (and a CUDA build of torch), '
    "or search with the .onnx file the engine was built from (runtime 'onnxruntime')"
)


def tensorrt_problems() -> list[str]:
    """What this machine lacks to run a TensorRT engine (empty when it can): the package, a CUDA device."""
    problems = []
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        problems.append(f"the tensorrt Python package is not importable ({exc})")
    try:
        import torch
    except ImportError:
        problems.append("torch (used for the CUDA buffers) is not installed")
    else:
        if not torch.cuda.is_available():
            problems.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    return problems


@RUNTIMES.register("tensorrt")
class TensorRTQueryEncoder(QueryEncoderRuntime):
    """A TensorRT engine file with its JSON sidecar, run on a CUDA device.

    Queries are embedded in batches of at most the profile's largest batch (and ``batch_size``); a batch
    smaller than the profile's smallest is padded with copies of its last image.

    Args:
        path: the engine file; its sidecar is ``<path>.json``.
        device: the CUDA device, e.g. ``"cuda"`` or ``"cuda:1"``.
        batch_size: most images per engine run (further capped by the profile).

    Raises:
        TensorRTSidecarError: the sidecar is missing or malformed, or the engine does not match its checksum.
        QueryEncoderError: no ``tensorrt`` package or no CUDA device here (the message says how to get them),
            or an engine that does not load with the installed TensorRT or does not have the sidecar's tensors.
    """

    expects = "a TensorRT engine file with its JSON sidecar <engine>.json (`retrieval export --format tensorrt`)"

    def __init__(self, path: str | Path, device: str = "cuda", batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.path = Path(path)
        self.batch_size = check_batch_size(batch_size)
        if not self.path.is_file():
            problem = "is not a file" if self.path.exists() else "not found"
            raise QueryEncoderError(f"TensorRT engine {self.path} {problem}")
        self.engine_info: TensorRTEngineInfo = read_engine_sidecar(self.path)
        engine_bytes = verify_engine_file(self.path, self.engine_info)  # before TensorRT: a CPU host reports it too
        problems = tensorrt_problems()
        if problems:
            raise QueryEncoderError(
                f"cannot run TensorRT engine {self.path} here: {'; '.join(problems)}. To use it, {_HOW_TO_GET_IT}"
            )
        encoder = self.engine_info.encoder
        self.encoder_id = encoder.encoder_id
        self.teacher_id = encoder.teacher_id
        self.dim = encoder.embedding_dim
        self.preprocess = encoder.preprocess
        # One execution context holds the shapes and addresses of one run; the HTTP API calls ``encode``
        # from several threads, so runs take turns (TensorRT contexts are not thread-safe).
        self._lock = threading.Lock()
        self._open_engine(device, engine_bytes)

    @classmethod
    def reject_reason(cls, path: Path) -> str | None:
        """``None`` for a file whose sidecar parses (JSON only: no TensorRT import, no GPU needed)."""
        if not path.is_file():
            return "not a file"
        if not sidecar_path(path).is_file():
            return f"no sidecar {sidecar_path(path).name}"
        try:
            read_engine_sidecar(path)
        except TensorRTSidecarError as exc:
            return str(exc)
        return None

    def _open_engine(self, device: str, engine_bytes: bytes) -> None:
        import tensorrt as trt
        import torch

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise QueryEncoderError(f"the TensorRT runtime runs on a CUDA device, got device {device!r}")
        info = self.engine_info
        if trt.__version__ != info.tensorrt_version:
            logger.warning(
                "TensorRT engine %s was built with TensorRT %s, this is %s; engines usually load only in the version "
                "that built them",
                self.path,
                info.tensorrt_version,
                trt.__version__,
            )
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise QueryEncoderError(
                    f"TensorRT {trt.__version__} cannot deserialise {self.path} (built with TensorRT "
                    f"{info.tensorrt_version}); rebuild it on this machine with `retrieval export --format tensorrt`"
                )
            names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
            missing = [name for name in (info.input_name, info.output_name) if name not in names]
            if missing:
                raise QueryEncoderError(
                    f"TensorRT engine {self.path} has no tensor {', '.join(missing)} named in its sidecar "
                    f"(it has {', '.join(sorted(names))}); the engine and its sidecar do not belong together"
                )
            self.context = self.engine.create_execution_context()
        self._input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(info.input_name)))
        self._output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(info.output_name)))
        logger.info("TensorRT query encoder %s on %s (batch %d..%d)", self.path, self.device, *self._batch_range())

    def _batch_range(self) -> tuple[int, int]:
        return self.engine_info.min_batch, min(self.batch_size, self.engine_info.max_batch)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        images = list(images)
        min_batch, per_run = self._batch_range()
        fmt = self.engine_info.encoder.input_format
        parts = []
        for chunk in chunks(images, max(per_run, 1)):
            batch = pad_batch(model_inputs(chunk, self.preprocess, fmt, self._input_dtype), min_batch)
            parts.append(self._run(batch)[: len(chunk)])
        return finish_embeddings(parts, len(images), self.dim, str(self.path))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        info = self.engine_info
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            inputs = torch.from_numpy(batch).to(self.device)
            if not self.context.set_input_shape(info.input_name, tuple(batch.shape)):
                raise QueryEncoderError(
                    f"TensorRT engine {self.path} refuses input shape {tuple(batch.shape)} (profile {info.profile})"
                )
            out_shape = tuple(self.context.get_tensor_shape(info.output_name))
            outputs = torch.empty(out_shape, dtype=_torch_dtype(self._output_dtype), device=self.device)
            self.context.set_tensor_address(info.input_name, inputs.data_ptr())
            self.context.set_tensor_address(info.output_name, outputs.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise QueryEncoderError(f"TensorRT engine {self.path} failed to run a batch of {len(batch)}")
            stream.synchronize()
            return outputs.float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TensorRTQueryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r}, device={str(self.device)!r})"


def _torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a numpy dtype (through an empty array, so no table to keep in step)."""
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
