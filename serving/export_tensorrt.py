"""A TensorRT engine built from the verified ONNX export, with the JSON sidecar that says what it is.

TensorRT compiles the ONNX graph for one GPU model and one TensorRT version; the serialized engine is opaque,
so ``X.engine.json`` beside it carries the export's query-encoder metadata (encoder id, dim, preprocessing,
precision), the engine file's SHA-256 (verified when it is opened) and the input shapes the engine accepts
(``serving.runtimes.tensorrt_sidecar`` reads it back). The network is created strongly typed (TensorRT 10 and
11; 11 has no fp16/int8 builder flags): every tensor keeps the type the ONNX graph gives it, so reduced
precision comes from the ONNX model itself (``--fp16`` converts it first with ``serving.export_fp16``). One
optimisation profile covers the batch range ``min <= opt <= max`` at the encoder's input size. Needs the
``tensorrt`` extra and an NVIDIA GPU.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.export import INPUT_NAME, OUTPUT_NAME, ExportError, export_onnx
from serving.export_files import publish, staged_file
from serving.runtimes.tensorrt_sidecar import engine_sidecar, write_engine_sidecar

if TYPE_CHECKING:
    from models.encoder import Encoder

__all__ = [
    "INSTALL_HINT",
    "TensorRTExport",
    "TensorRTUnavailableError",
    "batch_profile",
    "export_tensorrt",
    "require_tensorrt",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    'install it with `pip install -e ".[tensorrt]"` on a machine with an NVIDIA GPU and its driver; '
    "the .onnx export (`--format onnx`, with --fp16 for GPUs) works everywhere and runs on TensorRT through "
    "ONNX Runtime's TensorRT execution provider"
)


class TensorRTUnavailableError(ExportError):
    """TensorRT or a CUDA device is missing here; the message says what and how to get it."""


@dataclass(frozen=True)
class TensorRTExport:
    """A written engine and its sidecar.

    Attributes:
        path: the serialized engine; ``sidecar``: its JSON description.
        tensorrt_version: the TensorRT that built it (an engine loads only in that version).
        precision: ``fp32`` or ``fp16`` (the ONNX graph's; the network is strongly typed).
        profile: ``{"min"|"opt"|"max": [batch, 3, S, S]}``.
        onnx_min_cosine: worst cosine of the ONNX export vs PyTorch; ``engine_min_cosine``: engine vs ONNX export.
    """

    path: Path
    sidecar: Path
    tensorrt_version: str
    precision: str
    profile: dict[str, list[int]]
    onnx_min_cosine: float
    engine_min_cosine: float


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, checking that a CUDA device is visible.

    Raises:
        TensorRTUnavailableError: ``tensorrt`` is not installed, or no CUDA device is visible.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"--format tensorrt needs the TensorRT Python package, which is not installed here ({exc}); {INSTALL_HINT}"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            f"--format tensorrt needs an NVIDIA GPU, and no CUDA device is visible (TensorRT {tensorrt.__version__} "
            f"is installed); {INSTALL_HINT}"
        )
    return tensorrt


def batch_profile(min_batch: int, opt_batch: int, max_batch: int, input_size: int) -> dict[str, list[int]]:
    """The optimisation profile's input shapes ``[batch, 3, S, S]``.

    Raises:
        ExportError: not ``1 <= min_batch <= opt_batch <= max_batch``.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(
            f"the batch range must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got {min_batch}, "
            f"{opt_batch}, {max_batch}"
        )
    return {
        key: [batch, 3, input_size, input_size]
        for key, batch in zip(("min", "opt", "max"), (min_batch, opt_batch, max_batch), strict=True)
    }


def export_tensorrt(
    encoder: Encoder | str | Path,
    out_path: str | Path,
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    opset: int = 18,
) -> TensorRTExport:
    """Export to ONNX (verified; float16 with ``fp16``), build a TensorRT engine, check it, write engine and sidecar.

    Raises:
        TensorRTUnavailableError: no TensorRT or no CUDA device (checked first, before any work).
        ExportError: a bad batch range, a failed export, a graph TensorRT cannot parse or build, or an engine whose
            embeddings disagree with the ONNX export's; nothing is written at ``out_path`` then.
    """
    import onnx

    trt = require_tensorrt()
    batch_profile(min_batch, opt_batch, max_batch, 8)  # validate the range before minutes of work
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="retrieval-tensorrt-") as work:
        onnx_path = Path(work) / "encoder.onnx"
        if fp16:
            from serving.export_fp16 import export_onnx_fp16

            onnx_cosine = export_onnx_fp16(encoder, onnx_path, opset=opset).fp32_min_cosine
        else:
            onnx_cosine = export_onnx(encoder, onnx_path, opset=opset).min_cosine
        metadata = {prop.key: prop.value for prop in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        size = int(metadata["input_size"])
        profile = batch_profile(min_batch, opt_batch, max_batch, size)
        engine = _build_engine(trt, onnx_path, profile)
        with staged_file(out_path, ".engine") as tmp:
            tmp.write_bytes(engine)
            engine_cosine = _engine_parity(trt, tmp, onnx_path, metadata, profile)
            publish(tmp, out_path)
    sidecar = write_engine_sidecar(
        out_path, engine_sidecar(metadata, trt.__version__, INPUT_NAME, OUTPUT_NAME, profile, engine)
    )
    logger.info("built TensorRT %s engine %s (cosine vs ONNX %.6f)", trt.__version__, out_path, engine_cosine)
    return TensorRTExport(
        out_path, sidecar, trt.__version__, metadata["precision"], profile, onnx_cosine, engine_cosine
    )


def _build_engine(trt: Any, onnx_path: Path, profile: dict[str, list[int]]) -> bytes:
    """Parse the ONNX file into a strongly typed network and build a serialized engine for ``profile``."""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(INPUT_NAME, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(optimisation)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT {trt.__version__} could not build an engine for batches "
            f"{profile['min'][0]}..{profile['max'][0]} (see the TensorRT messages above)"
        )
    return bytes(serialized)


def _engine_parity(trt: Any, engine_path: Path, onnx_path: Path, metadata: dict[str, str], profile: dict) -> float:
    """Worst cosine between the engine's and ONNX Runtime's (CPU) embeddings of the same batch (the opt batch size).

    Raises:
        ExportError: the engine cannot be loaded or run, or its cosine is below ``FP16_PARITY_THRESHOLD``.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    from serving.export_fp16 import FP16_PARITY_THRESHOLD
    from serving.mobile_agreement import row_cosines

    batch, _, size, _ = profile["opt"]
    mean, std = json.loads(metadata["mean"]), json.loads(metadata["std"])
    pixels = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    images = ((pixels - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {INPUT_NAME: images})[0]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT cannot load the engine it just built ({engine_path})")
    context = engine.create_execution_context()
    device = torch.device("cuda")
    inputs = torch.from_numpy(images).to(device).contiguous()
    outputs = torch.empty((batch, reference.shape[1]), dtype=torch.float32, device=device)
    context.set_input_shape(INPUT_NAME, tuple(images.shape))
    context.set_tensor_address(INPUT_NAME, inputs.data_ptr())
    context.set_tensor_address(OUTPUT_NAME, outputs.data_ptr())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine it just built")
    stream.synchronize()
    worst = float(row_cosines(reference, outputs.cpu().numpy()).min())
    if not worst >= FP16_PARITY_THRESHOLD:
        raise ExportError(
            f"the TensorRT engine does not reproduce the ONNX export: minimum cosine {worst:.6f} < "
            f"{FP16_PARITY_THRESHOLD}"
        )
    return worst
