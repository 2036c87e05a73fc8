"""Query-encoder runtimes: the same ``encode(images)`` over a PyTorch checkpoint, an ONNX file or a TensorRT engine.

Every runtime takes its preprocessing from the artifact itself (the checkpoint's config, the ONNX
metadata, the engine's sidecar), never from the caller, so a query is prepared exactly like the gallery.
``open_query_encoder`` asks the registered runtimes (``RUNTIMES``) which one accepts a path
(``serving.runtimes.selection``). Importing this package imports neither torch nor ONNX Runtime nor
TensorRT: each runtime loads its framework when it opens a model, so the ONNX path never pays for torch.
"""

from serving.runtimes.base import DEFAULT_BATCH_SIZE, RUNTIMES, QueryEncoder, QueryEncoderError, QueryEncoderRuntime
from serving.runtimes.onnx_runtime import OnnxRuntimeQueryEncoder
from serving.runtimes.selection import SELECTION_ORDER, open_query_encoder, runtime_for
from serving.runtimes.tensorrt_runtime import TensorRTQueryEncoder
from serving.runtimes.tensorrt_sidecar import ENGINE_FORMAT, TensorRTSidecarError, read_engine_sidecar
from serving.runtimes.torch_runtime import TorchQueryEncoder

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ENGINE_FORMAT",
    "RUNTIMES",
    "SELECTION_ORDER",
    "OnnxRuntimeQueryEncoder",
    "QueryEncoder",
    "QueryEncoderError",
    "QueryEncoderRuntime",
    "TensorRTQueryEncoder",
    "TensorRTSidecarError",
    "TorchQueryEncoder",
    "open_query_encoder",
    "read_engine_sidecar",
    "runtime_for",
]
