"""Which ONNX Runtime execution providers a query encoder runs on, and in what order.

Default order, among the providers the installed ONNX Runtime offers: CUDA, then CPU
(``DEFAULT_PROVIDERS``). The ``onnxruntime-gpu`` build (``pip install -e ".[gpu]"``) offers CUDA; the
plain build offers CPU only, and the default then quietly runs on CPU.

The TensorRT execution provider is never chosen by default, only when asked for
(``providers=["tensorrt", "cuda", "cpu"]``): it compiles a TensorRT engine when the session starts,
which takes minutes for a real backbone and happens again for every new input shape, so a server or a
CLI call would stall on it unannounced. Where TensorRT speed is wanted, build the engine once ahead of
time (``retrieval export --format tensorrt``) and open it with the ``tensorrt`` runtime.

Asked-for providers that are not installed are dropped with a warning (ONNX Runtime itself would
fail or silently skip them); if none is left, the error lists what is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from serving.runtimes.base import QueryEncoderError

__all__ = ["DEFAULT_PROVIDERS", "PROVIDER_ALIASES", "ProviderSpec", "resolve_providers"]

logger = logging.getLogger(__name__)

#: Preference order when the caller names no providers (the TensorRT provider is left out on purpose).
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: Short names accepted for the common providers (a CLI flag reads better with ``cuda`` than the full name).
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider",
}

#: A provider name, or ``(name, options)`` as ONNX Runtime accepts it.
ProviderSpec = str | tuple[str, dict[str, Any]]


def resolve_providers(requested: Sequence[ProviderSpec] | None, available: Sequence[str]) -> list[ProviderSpec]:
    """The providers to hand to ``onnxruntime.InferenceSession``, in order.

    Args:
        requested: provider names (full or a ``PROVIDER_ALIASES`` key, any case) or ``(name, options)``
            pairs, in order of preference; ``None`` for ``DEFAULT_PROVIDERS``.
        available: ``onnxruntime.get_available_providers()``.

    Raises:
        QueryEncoderError: none of the requested providers is installed.
    """
    if requested is None:
        chosen: list[ProviderSpec] = [name for name in DEFAULT_PROVIDERS if name in available]
        return chosen or ["CPUExecutionProvider"]
    if isinstance(requested, str):  # one name passed where a list was meant
        requested = [requested]
    chosen, missing = [], []
    for spec in requested:
        name, options = (spec, None) if isinstance(spec, str) else (spec[0], spec[1])
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            missing.append(name)
        elif name not in [c if isinstance(c, str) else c[0] for c in chosen]:
            chosen.append(name if options is None else (name, dict(options)))
    if missing:
        logger.warning(
            "ONNX Runtime execution providers not installed here, skipped: %s (installed: %s)",
            ", ".join(missing),
            ", ".join(available),
        )
    if not chosen:
        raise QueryEncoderError(
            f"none of the requested ONNX Runtime execution providers is installed ({', '.join(missing)}); "
            f'installed: {", ".join(available)}. CUDA needs the onnxruntime-gpu build (pip install -e ".[gpu]")'
        )
    return chosen
