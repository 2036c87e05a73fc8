"""Export an encoder to a self-describing ONNX file, verified against PyTorch before it is kept.

Exporter choice: the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``) is
the default and maintained path in torch 2.14; the TorchScript exporter is deprecated. With
``dynamic_shapes`` marked ``Dim.DYNAMIC`` it lets ``torch.export`` infer the valid range of the
batch, height and width axes itself, instead of failing on hand-written bounds that a given
backbone's strides contradict. Both exporters give cosine 1.0 to within float32 rounding on the
encoders here; the TorchScript one is ~10x faster to run, so it stays as a fallback
(``exporter="auto"``) for models that ``torch.export`` cannot trace.

Every export is checked before it replaces anything: ONNX Runtime must reproduce the PyTorch
embeddings (minimum cosine >= ``PARITY_THRESHOLD``) at the export size with a batch other than
the traced one, and at a second image size (GeM is a spatial mean, so the graph must
generalise over H and W). The file is written beside its target and renamed into place, so a
failed or interrupted export never leaves a half-written or wrong model at ``out_path``.

The written file carries its own SHA-256 in the ``file_sha256`` metadata property
(``serving.model_checksum``), sealed once the graph and the other metadata are final; runtimes verify
it on open, so a file damaged in transit fails with a message instead of answering wrongly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from retrieval.errors import UserFacingError
from serving.export_files import publish, staged_file
from serving.model_checksum import seal_file
from serving.onnx_metadata import OnnxMetadataError, encoder_metadata

if TYPE_CHECKING:
    import torch

    from models.encoder import Encoder

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_THRESHOLD",
    "ExportError",
    "OnnxExport",
    "check_onnx_parity",
    "export_onnx",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: Smallest acceptable cosine between PyTorch and ONNX Runtime embeddings of the same image.
PARITY_THRESHOLD = 0.9999
#: Names given to the dynamic axes of the input ``(batch, 3, height, width)``.
_AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}

Exporter = Literal["auto", "dynamo", "torchscript"]


class ExportError(UserFacingError, RuntimeError):
    """An export that failed or whose ONNX output does not match PyTorch."""


@dataclass(frozen=True)
class OnnxExport:
    """A written, verified export: where it is, how closely it matches PyTorch, which exporter made it."""

    path: Path
    min_cosine: float
    exporter: str


def export_onnx(
    encoder: Encoder | str | Path,
    out_path: str | Path,
    opset: int = 18,
    example_size: int | None = None,
    exporter: Exporter = "auto",
) -> OnnxExport:
    """Export ``encoder`` to ONNX with dynamic batch, height and width, and verify it.

    Args:
        encoder: an ``models.Encoder`` with an ``encoder_id`` (saved or loaded from a checkpoint), or the
            path of a checkpoint directory.
        out_path: the ``.onnx`` file to write (replaced atomically; parent folders are created).
        opset: ONNX opset version.
        example_size: image side used for tracing; defaults to the encoder's ``preprocess.input_size``.
        exporter: ``"dynamo"`` (torch.export), ``"torchscript"`` (legacy), or ``"auto"`` (dynamo, falling
            back to torchscript when tracing fails).

    Returns:
        The written path with the minimum PyTorch/ONNX Runtime cosine over the two parity checks (at the
        export size, batch 3, and at size + 32, batch 2).

    Raises:
        ExportError: the encoder has no id, the exporter failed, or the parity check failed; nothing is
            written at ``out_path`` then.
    """
    import torch

    if isinstance(encoder, (str, Path)):
        from models.checkpoint import load_encoder

        encoder = load_encoder(encoder)
    try:
        metadata = encoder_metadata(encoder)
    except OnnxMetadataError as exc:
        raise ExportError(str(exc)) from exc
    model = copy.deepcopy(encoder).cpu().float().eval()  # the caller's encoder keeps its device and mode
    pre = encoder.config.preprocess
    size = int(example_size or pre.input_size)
    out_path = Path(out_path)
    with staged_file(out_path, suffix=".onnx") as tmp:
        example = _example_images(pre.mean, pre.std, batch=2, size=size, seed=0)
        with torch.no_grad(), _quiet_exporter_logs():
            used = _run_exporter(model, example, tmp, opset, exporter)
        _finalise_model(tmp, metadata, int(encoder.config.embedding_dim))
        worst = min(
            check_onnx_parity(model, tmp, _example_images(pre.mean, pre.std, batch=3, size=size, seed=1)),
            check_onnx_parity(model, tmp, _example_images(pre.mean, pre.std, batch=2, size=size + 32, seed=2)),
        )
        if not worst >= PARITY_THRESHOLD:  # also catches NaN
            raise ExportError(
                f"ONNX export of encoder {metadata['encoder_id']} does not reproduce PyTorch: minimum cosine "
                f"{worst:.6f} < {PARITY_THRESHOLD} (exporter {used}, opset {opset})"
            )
        publish(tmp, out_path)
    logger.info(
        "exported encoder %s to %s (%s exporter, parity cosine %.6f)", metadata["encoder_id"], out_path, used, worst
    )
    return OnnxExport(path=out_path, min_cosine=worst, exporter=used)


def check_onnx_parity(encoder: torch.nn.Module, onnx_path: str | Path, images: torch.Tensor) -> float:
    """Minimum cosine similarity between PyTorch and ONNX Runtime (CPU) embeddings of ``images``.

    Args:
        encoder: the PyTorch module the file was exported from (run in eval mode, no grad).
        onnx_path: the exported model.
        images: a normalised batch ``(N, 3, H, W)``.

    Raises:
        ExportError: ONNX Runtime cannot load or run the model on this input, or the output shapes differ.
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
        raise ExportError(f"ONNX Runtime cannot run {onnx_path} on input {tuple(batch.shape)}: {exc}") from exc
    if output.shape != reference.shape:
        raise ExportError(f"{onnx_path} returns shape {output.shape}; PyTorch returns {reference.shape}")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(output, axis=1)
    cosine = (reference * output).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(np.nan_to_num(cosine, nan=-1.0).min())


def _example_images(mean: tuple[float, ...], std: tuple[float, ...], batch: int, size: int, seed: int) -> torch.Tensor:
    """Seeded random images in [0, 1], normalised like real inputs (so activations are in range)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, size, size, generator=generator)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _run_exporter(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: Exporter) -> str:
    """Write the bare graph to ``path`` with the chosen exporter; return the name of the one that worked."""
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; valid: auto, dynamo, torchscript")
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, path, opset)
            return "dynamo"
        except Exception as exc:  # torch.export raises many error types for untraceable code
            if exporter == "dynamo":
                raise ExportError(f"torch.export-based ONNX export failed: {type(exc).__name__}: {exc}") from exc
            logger.warning(
                "dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter", type(exc).__name__, exc
            )
    try:
        _export_torchscript(model, example, path, opset)
    except Exception as exc:
        raise ExportError(f"TorchScript ONNX export failed: {type(exc).__name__}: {exc}") from exc
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


def _finalise_model(path: Path, metadata: dict[str, str], embedding_dim: int) -> None:
    """Name the dynamic axes, fix the embedding axis, attach the metadata, validate and seal the file, in place."""
    import onnx

    model = onnx.load(str(path))
    _rename_dynamic_axes(model)
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(output_dims) == 2 and not output_dims[1].dim_value:  # the TorchScript exporter leaves it symbolic
        output_dims[1].dim_value = embedding_dim
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    model.producer_name = "retrieval-engine"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX graph is invalid: {exc}") from exc
    onnx.save(model, str(path))
    seal_checksum(path)


def seal_checksum(path: Path) -> str:
    """Seal a saved export whose ``file_sha256`` holds the placeholder (``serving.model_checksum``); return it.

    Raises:
        ExportError: the placeholder is not in the file exactly once (it was not written by ``encoder_metadata``).
    """
    try:
        return seal_file(path)
    except ValueError as exc:
        raise ExportError(f"cannot write the checksum of {path}: {exc}") from exc


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
