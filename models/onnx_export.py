"""Export an encoder to an ONNX graph and prove that ONNX Runtime reproduces it: shared by every ONNX consumer.

Two stages run an encoder outside PyTorch: serving (the query encoder a server or a phone opens,
``serving.export``) and indexing (the gallery encoder run by ONNX Runtime on CPU, ``indexing.onnx_cache``).
Both need the same three steps, kept here once, below both stages:

1. trace the encoder into a graph with dynamic batch, height and width axes;
2. tidy the graph (axis names, a static embedding axis, the caller's metadata properties) and validate it;
3. check parity: ONNX Runtime's embeddings of seeded images must match PyTorch's (minimum cosine >=
   ``PARITY_THRESHOLD``) at the traced size with another batch, and at a second size (GeM is a spatial
   mean, so the graph must generalise over H and W).

Exporter choice: the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``) is the
default and maintained path in torch 2.14; the TorchScript exporter is deprecated. With ``dynamic_shapes``
marked ``Dim.DYNAMIC`` it lets ``torch.export`` infer the valid range of the batch, height and width axes
itself, instead of failing on hand-written bounds that a given backbone's strides contradict. Both exporters
give cosine 1.0 to within float32 rounding on the encoders here; the TorchScript one is ~10x faster to run,
so it stays as a fallback (``exporter="auto"``) for models that ``torch.export`` cannot trace.

Where the file goes and how it is published (atomic rename, checksum) is the caller's business: this module
writes and checks the path it is given.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from retrieval.errors import UserFacingError

if TYPE_CHECKING:
    import torch

    from models.encoder import Encoder

__all__ = [
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_THRESHOLD",
    "Exporter",
    "OnnxExportError",
    "VerifiedGraph",
    "check_onnx_parity",
    "example_images",
    "export_verified_graph",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: Smallest acceptable cosine between PyTorch and ONNX Runtime embeddings of the same image.
PARITY_THRESHOLD = 0.9999
#: Names given to the dynamic axes of the input ``(batch, 3, height, width)``.
_AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}

Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")


class OnnxExportError(UserFacingError, RuntimeError):
    """An export that failed, or whose ONNX Runtime output does not match PyTorch."""


@dataclass(frozen=True)
class VerifiedGraph:
    """A graph written and checked: which exporter made it and how closely ONNX Runtime matches PyTorch."""

    path: Path
    exporter: str
    min_cosine: float


def export_verified_graph(
    encoder: Encoder,
    path: str | Path,
    metadata: Mapping[str, str],
    *,
    opset: int = 18,
    example_size: int | None = None,
    exporter: Exporter = "auto",
) -> VerifiedGraph:
    """Write ``encoder`` as an ONNX graph at ``path`` (overwritten in place) and verify it against PyTorch.

    The caller's encoder keeps its device, dtype and train/eval mode: a float32 CPU copy is exported.

    Args:
        encoder: an ``models.Encoder`` (its ``config`` gives the input size, mean/std and embedding size).
        path: the file to write; stage it beside its final place, since a failed check leaves it behind.
        metadata: string properties to store in the model (replacing any the exporter wrote).
        opset: ONNX opset version.
        example_size: image side used for tracing; defaults to the encoder's ``preprocess.input_size``.
        exporter: ``"dynamo"`` (torch.export), ``"torchscript"`` (legacy), or ``"auto"`` (dynamo, falling
            back to torchscript when tracing fails).

    Returns:
        The path, the exporter that worked and the minimum PyTorch/ONNX Runtime cosine over the two parity
        checks (at the export size, batch 3, and at size + 32, batch 2).

    Raises:
        OnnxExportError: the exporter failed, the graph is invalid, or the parity check failed.
    """
    import torch

    model = copy.deepcopy(encoder).cpu().float().eval()
    pre = encoder.config.preprocess
    size = int(example_size or pre.input_size)
    path = Path(path)
    example = example_images(pre.mean, pre.std, batch=2, size=size, seed=0)
    with torch.no_grad(), _quiet_exporter_logs():
        used = _run_exporter(model, example, path, opset, exporter)
    _finalise_graph(path, metadata, int(encoder.config.embedding_dim))
    worst = min(
        check_onnx_parity(model, path, example_images(pre.mean, pre.std, batch=3, size=size, seed=1)),
        check_onnx_parity(model, path, example_images(pre.mean, pre.std, batch=2, size=size + 32, seed=2)),
    )
    if not worst >= PARITY_THRESHOLD:  # also catches NaN
        raise OnnxExportError(
            f"ONNX export of encoder {getattr(encoder, 'encoder_id', None)} does not reproduce PyTorch: minimum "
            f"cosine {worst:.6f} < {PARITY_THRESHOLD} (exporter {used}, opset {opset})"
        )
    return VerifiedGraph(path=path, exporter=used, min_cosine=worst)


def check_onnx_parity(encoder: torch.nn.Module, onnx_path: str | Path, images: torch.Tensor) -> float:
    """Minimum cosine similarity between PyTorch and ONNX Runtime (CPU) embeddings of ``images``.

    Args:
        encoder: the PyTorch module the file was exported from (run in eval mode, no grad).
        onnx_path: the exported model.
        images: a normalised batch ``(N, 3, H, W)``.

    Raises:
        OnnxExportError: ONNX Runtime cannot load or run the model on this input, or the output shapes differ.
    """
    import onnxruntime as ort
    import torch

    from models.encoder import eval_mode

    with eval_mode(encoder), torch.no_grad():
        device = next(encoder.parameters()).device
        reference = encoder(images.to(device)).float().cpu().numpy()
    batch = images.detach().cpu().float().numpy()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        output = session.run(None, {session.get_inputs()[0].name: batch})[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise OnnxExportError(f"ONNX Runtime cannot run {onnx_path} on input {tuple(batch.shape)}: {exc}") from exc
    if output.shape != reference.shape:
        raise OnnxExportError(f"{onnx_path} returns shape {output.shape}; PyTorch returns {reference.shape}")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(output, axis=1)
    cosine = (reference * output).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(np.nan_to_num(cosine, nan=-1.0).min())


def example_images(mean: tuple[float, ...], std: tuple[float, ...], batch: int, size: int, seed: int) -> torch.Tensor:
    """Seeded random images in [0, 1], normalised like real inputs (so activations are in range)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, size, size, generator=generator)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _run_exporter(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: Exporter) -> str:
    """Write the bare graph to ``path`` with the chosen exporter; return the name of the one that worked."""
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, path, opset)
            return "dynamo"
        except Exception as exc:  # torch.export raises many error types for untraceable code
            if exporter == "dynamo":
                raise OnnxExportError(f"torch.export-based ONNX export failed: {type(exc).__name__}: {exc}") from exc
            logger.warning(
                "dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter", type(exc).__name__, exc
            )
    try:
        _export_torchscript(model, example, path, opset)
    except Exception as exc:
        raise OnnxExportError(f"TorchScript ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return "torchscript"


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import torch

    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({axis: dynamic for axis in _AXIS_NAMES},),
        opset_version=opset,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)  # one self-contained file (models up to 2 GB)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we chose this path knowingly, as a fallback
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: _AXIS_NAMES, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )


def _finalise_graph(path: Path, metadata: Mapping[str, str], embedding_dim: int) -> None:
    """Name the dynamic axes, fix the embedding axis, attach the metadata and validate the file, in place."""
    import onnx

    model = onnx.load(str(path))
    _rename_dynamic_axes(model)
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(output_dims) == 2 and not output_dims[1].dim_value:  # the TorchScript exporter leaves it symbolic
        output_dims[1].dim_value = embedding_dim
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(metadata))
    model.producer_name = "retrieval-engine"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"the exported ONNX graph is invalid: {exc}") from exc
    onnx.save(model, str(path))


def _rename_dynamic_axes(model: object) -> None:
    """Replace the exporter's symbol names (``s77``...) by ``batch``/``height``/``width`` everywhere."""
    graph = model.graph  # type: ignore[attr-defined]
    renames = {}
    for axis, name in _AXIS_NAMES.items():
        dim = graph.input[0].type.tensor_type.shape.dim[axis]
        if dim.dim_param and dim.dim_param != name:
            renames[dim.dim_param] = name
    if not renames:
        return
    symbol = re.compile("|".join(rf"\b{re.escape(old)}\b" for old in renames))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:  # may be an expression such as "s53//32"
                dim.dim_param = symbol.sub(lambda match: renames[match.group(0)], dim.dim_param)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Keep the exporter's optimisation passes (one INFO line per pass) out of an INFO-level log."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
