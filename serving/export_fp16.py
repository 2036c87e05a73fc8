"""A float16 ONNX export for GPUs: half the weights' size and tensor-core speed, float32 inputs and outputs.

The verified float32 export (``serving.export.export_onnx``) is converted with ONNX Runtime's
``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``: callers keep feeding
normalised float32 batches and reading float32 embeddings (the contract of ``input_format``
``float32_normalized``), and the metadata says ``precision: fp16``. The embedding tail (GeM's power and
mean, the head, the L2 norm; see ``serving.onnx_graph.embedding_tail``) stays float32: it is tiny, and in
float16 GeM's ``x**p`` can overflow and the output norm drifts.

fp16 is meant for GPUs (CUDA or TensorRT execution providers, or ``--format tensorrt --fp16``). On a CPU,
ONNX Runtime runs most float16 ops by casting back to float32, so the file is usually slower there than the
float32 export. The file is still verified before it is kept: its embeddings must agree with the float32
export's (minimum cosine >= ``FP16_PARITY_THRESHOLD``) at the export size and at a second size, run by ONNX
Runtime on CUDA where installed, else on the CPU.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.export import ExportError, export_onnx, seal_checksum
from serving.export_files import publish, staged_file
from serving.model_checksum import CHECKSUM_KEY, PLACEHOLDER
from serving.onnx_graph import drop_round_trip_casts, embedding_tail, topological_sort
from serving.onnx_metadata import read_onnx_metadata, update_onnx_metadata

if TYPE_CHECKING:
    import onnx

    from models.encoder import Encoder

__all__ = ["FP16_PARITY_THRESHOLD", "Fp16Export", "convert_to_fp16", "export_onnx_fp16", "onnx_agreement"]

logger = logging.getLogger(__name__)

#: Smallest acceptable cosine between the float16 and the float32 export's embeddings of the same image.
FP16_PARITY_THRESHOLD = 0.999


@dataclass(frozen=True)
class Fp16Export:
    """A written, verified float16 export.

    Attributes:
        path: the ``.onnx`` file.
        min_cosine: worst cosine between its embeddings and the float32 export's (two image sizes).
        fp32_min_cosine: worst cosine between the float32 export and PyTorch (as ``OnnxExport.min_cosine``).
        verified_on: the ONNX Runtime execution provider that ran the check.
        fp32_bytes: size of the float32 export, for comparison.
        fp16_bytes: size of the written file.
        exporter: the torch exporter that produced the float32 graph.
    """

    path: Path
    min_cosine: float
    fp32_min_cosine: float
    verified_on: str
    fp32_bytes: int
    fp16_bytes: int
    exporter: str


def export_onnx_fp16(
    encoder: Encoder | str | Path,
    out_path: str | Path,
    opset: int = 18,
    min_cosine: float = FP16_PARITY_THRESHOLD,
) -> Fp16Export:
    """Export ``encoder`` to a float16 ONNX file (float32 I/O, dynamic batch and size), verified.

    Args:
        encoder: an ``Encoder`` with an id, or a checkpoint directory.
        out_path: the ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset of the float32 export.
        min_cosine: the agreement with the float32 export required to keep the file.

    Raises:
        ExportError: the float32 export failed, the converted graph is invalid or cannot run, or it agrees
            less than ``min_cosine`` with the float32 export; nothing is written at ``out_path`` then.
    """
    import onnx

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="retrieval-fp16-") as work:
        fp32 = export_onnx(encoder, Path(work) / "fp32.onnx", opset=opset)
        info = read_onnx_metadata(fp32.path)
        with staged_file(out_path, suffix=".onnx") as tmp:
            model = convert_to_fp16(onnx.load(str(fp32.path)))
            update_onnx_metadata(model, {"precision": "fp16", CHECKSUM_KEY: PLACEHOLDER}, str(out_path))
            onnx.save(model, str(tmp))
            seal_checksum(tmp)
            size = info.preprocess.input_size
            cosines, provider = [], ""
            for batch, side, seed in ((3, size, 1), (2, size + 32, 2)):
                images = _normalised_noise(batch, side, info.preprocess.mean, info.preprocess.std, seed)
                cosine, provider = onnx_agreement(fp32.path, tmp, images)
                cosines.append(cosine)
            worst = min(cosines)
            if not worst >= min_cosine:  # also catches NaN
                raise ExportError(
                    f"float16 export of encoder {info.encoder_id} does not reproduce the float32 export: minimum "
                    f"cosine {worst:.6f} < {min_cosine} (run on {provider}); export without --fp16"
                )
            fp16_bytes = tmp.stat().st_size
            publish(tmp, out_path)
        fp32_bytes = fp32.path.stat().st_size
    logger.info("exported encoder %s as float16 to %s (cosine vs fp32 %.6f)", info.encoder_id, out_path, worst)
    return Fp16Export(out_path, worst, fp32.min_cosine, provider, fp32_bytes, fp16_bytes, fp32.exporter)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 export: same inputs and outputs (float32), the embedding tail in float32.

    Raises:
        ExportError: the converted graph fails the ONNX checker.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _with_node_names(model)
    tail = embedding_tail(model.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the model has values out of float16 range": clamped
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST),
            node_block_list=tail,
        )
    drop_round_trip_casts(converted.graph, set(tail))
    topological_sort(converted.graph)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the float16 conversion produced an invalid ONNX graph: {exc}") from exc
    return converted


def onnx_agreement(reference_path: str | Path, candidate_path: str | Path, images: np.ndarray) -> tuple[float, str]:
    """Minimum cosine between two ONNX models' embeddings of the same float32 batch, and the provider used.

    Runs on ONNX Runtime's CUDA provider where installed (where float16 is meant to run), else on the CPU.

    Raises:
        ExportError: either model cannot be loaded or run, or the output shapes differ.
    """
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else None
    providers = [provider, "CPUExecutionProvider"] if provider else ["CPUExecutionProvider"]
    outputs = []
    for path in (reference_path, candidate_path):
        try:
            session = ort.InferenceSession(str(path), providers=providers)
            outputs.append(session.run(None, {session.get_inputs()[0].name: images})[0].astype(np.float32))
        except Exception as exc:  # onnxruntime raises its own Fail/NotImplemented types
            raise ExportError(
                f"ONNX Runtime ({', '.join(providers)}) cannot run {path} on input {images.shape}: {exc}"
            ) from exc
    reference, candidate = outputs
    if reference.shape != candidate.shape:
        raise ExportError(
            f"{candidate_path} returns shape {candidate.shape}; {reference_path} returns {reference.shape}"
        )
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(np.nan_to_num(cosine, nan=-1.0).min()), session.get_providers()[0]


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique name (the converter blocks nodes by name)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {node.name for node in copy.graph.node if node.name}
    for i, node in enumerate(copy.graph.node):
        if not node.name:
            name = f"node_{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return copy


def _normalised_noise(batch: int, size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> np.ndarray:
    """Seeded uniform pixels in [0, 1], normalised like real inputs (so activations are in range)."""
    pixels = np.random.default_rng(seed).random((batch, 3, size, size), dtype=np.float32)
    return (
        (pixels - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    ).astype(np.float32)
