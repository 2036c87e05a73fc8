"""Static int8 quantisation of a float ONNX graph (QDQ, per-channel weights) and its ORT-format copy.

Static rather than dynamic quantisation: dynamic quantisation computes activation ranges at run time and
only covers matrix products well, which makes convolutional nets several times slower on CPU, while static
ranges calibrated on real images let ONNX Runtime run the convolutions as integer kernels. QDQ format
(``QuantizeLinear``/``DequantizeLinear`` pairs around float ops) is what ONNX Runtime's mobile and NPU
execution providers expect; weights get one scale per output channel (``per_channel``), activations are
uint8 and weights int8 (ONNX Runtime's recommended U8S8 pair). Ops that are not quantised (GeM's power and
mean, the L2 norm) stay float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["quantize_int8", "save_ort_format"]

logger = logging.getLogger(__name__)


def quantize_int8(float_path: str | Path, out_path: str | Path, input_name: str, inputs: Iterable[np.ndarray]) -> None:
    """Write the int8 QDQ quantisation of ``float_path`` (a static-shape graph) to ``out_path``.

    Args:
        float_path: float32 model with static input shapes.
        out_path: where the quantised ``.onnx`` goes.
        input_name: the model's input.
        inputs: calibration batches, each exactly as the model takes it (e.g. ``(1, 3, S, S)`` uint8).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    prepared = Path(out_path).with_name(Path(out_path).stem + ".prepared.onnx")
    try:
        # Symbolic shape inference is skipped: with a static input, ONNX shape inference and ONNX Runtime's
        # constant folding (which quant_pre_process runs) resolve every shape, and the symbolic pass fails on
        # the Shape -> Expand of F.normalize.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)


def save_ort_format(onnx_path: str | Path, ort_path: str | Path) -> None:
    """Write ``onnx_path`` in ORT format (the flatbuffer format ONNX Runtime's mobile builds load) to ``ort_path``.

    As ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does by default ("fixed" optimisation style):
    graph optimisations applied once at conversion, except the x86-only NCHWc layout transform, so the file
    runs on ARM phones as well.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(
        str(onnx_path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["NchwcTransformer"],
    )
