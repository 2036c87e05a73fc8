"""Execution-provider order: CUDA then CPU by availability, TensorRT only when asked, overridable."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from serving.runtimes import QueryEncoderError
from serving.runtimes.onnx_providers import DEFAULT_PROVIDERS, resolve_providers

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_default_is_cuda_then_cpu_among_the_installed():
    assert DEFAULT_PROVIDERS == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert resolve_providers(None, CPU_ONLY) == ["CPUExecutionProvider"]
    # TensorRT is installed in a GPU build but never chosen unasked: it would build engines at start-up.
    assert resolve_providers(None, GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_default_on_this_machine():
    expected = [p for p in DEFAULT_PROVIDERS if p in ort.get_available_providers()]
    assert resolve_providers(None, ort.get_available_providers()) == expected


def test_asked_order_is_kept_with_aliases_and_options():
    assert resolve_providers(["TensorRT", "cuda", "CPU"], GPU_BUILD) == GPU_BUILD
    assert resolve_providers(["cpu", "cuda"], GPU_BUILD) == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert resolve_providers("cpu", CPU_ONLY) == ["CPUExecutionProvider"]
    with_options = resolve_providers([("cuda", {"device_id": 1}), "cpu", "CPUExecutionProvider"], GPU_BUILD)
    assert with_options == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_missing_providers_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="serving.runtimes"):
        chosen = resolve_providers(["tensorrt", "cuda", "cpu"], CPU_ONLY)
    assert chosen == ["CPUExecutionProvider"]
    assert "not installed here, skipped: TensorrtExecutionProvider, CUDAExecutionProvider" in caplog.text


def test_none_installed_is_an_error_listing_what_is():
    with pytest.raises(
        QueryEncoderError, match=r"\(CUDAExecutionProvider\); installed: AzureExecutionProvider, CPU.*gpu"
    ):
        resolve_providers(["cuda"], CPU_ONLY)
