"""The mobile graph's front: a static ``(1, 3, S, S)`` uint8 RGB input that the graph scales and normalises itself.

An app then only decodes and resizes (``retrieval.data.preprocess.to_uint8_chw``); the normalisation that
must match training exactly (``/ 255``, ``- mean``, ``/ std`` from the checkpoint) travels inside the model,
as ``Cast -> Div(255) -> Sub(mean) -> Div(std)`` in front of the float export, the same float32 steps as
``retrieval.data.preprocess.normalise_array``. A static shape lets the quantiser and mobile runtimes plan
every buffer ahead; phones embed one photo at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from retrieval.data.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import onnx

__all__ = ["MOBILE_INPUT_NAME", "uint8_input_model"]

#: The input of a mobile export: one resized RGB image, uint8, channels first.
MOBILE_INPUT_NAME = "image"
_PREFIX = "preprocess/"


def uint8_input_model(float_model: onnx.ModelProto, pre: PreprocessConfig) -> onnx.ModelProto:
    """A copy of a float export (input ``(N, 3, H, W)`` normalised float32) that takes ``(1, 3, S, S)`` uint8 pixels.

    Args:
        float_model: the verified float export (one input, one ``(N, D)`` output).
        pre: the encoder's preprocessing (``input_size`` S, ``mean``, ``std``).

    Raises:
        ValueError: the model does not have exactly one input and one output, or the result fails shape inference.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(float_model.graph.input) != 1 or len(float_model.graph.output) != 1:
        raise ValueError(
            f"expected a float export with one input and one output, got {len(float_model.graph.input)} and "
            f"{len(float_model.graph.output)}"
        )
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    graph = model.graph
    float_input = graph.input[0].name
    size = int(pre.input_size)
    constants = {
        "scale": np.array(255.0, dtype=np.float32),
        "mean": np.asarray(pre.mean, dtype=np.float32).reshape(1, 3, 1, 1),
        "std": np.asarray(pre.std, dtype=np.float32).reshape(1, 3, 1, 1),
    }
    graph.initializer.extend(numpy_helper.from_array(value, _PREFIX + name) for name, value in constants.items())
    front = [
        helper.make_node("Cast", [MOBILE_INPUT_NAME], [_PREFIX + "float"], to=TensorProto.FLOAT, name=_PREFIX + "cast"),
        helper.make_node("Div", [_PREFIX + "float", _PREFIX + "scale"], [_PREFIX + "unit"], name=_PREFIX + "scale"),
        helper.make_node("Sub", [_PREFIX + "unit", _PREFIX + "mean"], [_PREFIX + "centred"], name=_PREFIX + "centre"),
        helper.make_node("Div", [_PREFIX + "centred", _PREFIX + "std"], [float_input], name=_PREFIX + "normalise"),
    ]
    for position, node in enumerate(front):
        graph.node.insert(position, node)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(MOBILE_INPUT_NAME, TensorProto.UINT8, [1, 3, size, size]))
    output_dims = graph.output[0].type.tensor_type.shape.dim
    output_dims[0].Clear()
    output_dims[0].dim_value = 1
    del graph.value_info[:]  # inferred for dynamic axes; inferred again below for the static shape
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ValueError(f"the uint8-input graph at {size}x{size} is invalid: {exc}") from exc
    return model
