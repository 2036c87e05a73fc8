"""Where a FAISS index runs: a GPU replica when faiss-gpu sees a device and supports the type, else the CPU.

The CPU index is always the copy that is saved, listed and reconstructed; a GPU replica, when there is one,
trains, adds and searches, and is copied again from the CPU index after anything changes it there.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

from indexing.faiss_layers import faiss_lib, hnsw_of, is_fast_scan, refine_of, unwrap

__all__ = ["GPU_MAX_K", "Device", "gpu_available", "gpu_resources", "knn_cap", "to_gpu", "use_gpu"]

logger = logging.getLogger(__name__)

#: Largest k (and nprobe) FAISS's GPU k-selection supports.
GPU_MAX_K = 2048

Device = Literal["auto", "cpu", "gpu"]


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and at least one GPU is visible."""
    faiss = faiss_lib()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process: it reserves scratch memory on the device."""
    return faiss_lib().StandardGpuResources()


def use_gpu(device: Device) -> bool:
    """Whether an index asked to run on ``device`` gets a GPU replica.

    Raises:
        ValueError: an unknown device, or ``"gpu"`` without faiss-gpu and a visible GPU.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not gpu_available():
        raise ValueError("device='gpu' but faiss has no GPU support here or no GPU is visible")
    return device != "cpu" and gpu_available()


def to_gpu(index: Any, factory: str) -> Any:
    """A GPU replica of the CPU ``index``, or None (logged) for types faiss-gpu does not support, like HNSW."""
    faiss = faiss_lib()
    if hnsw_of(index) is not None:
        logger.info("%s stays on CPU: faiss-gpu has no HNSW index", factory)
        return None
    if refine_of(index) is not None or is_fast_scan(index):
        logger.info("%s stays on CPU: faiss-gpu has no refine or 4-bit fast-scan index", factory)
        return None
    try:
        replica = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    except RuntimeError as exc:
        logger.info("%s stays on CPU: faiss-gpu cannot hold it (%s)", factory, str(exc).splitlines()[0])
        return None
    if not isinstance(unwrap(replica), faiss.GpuIndex):  # the cloner copied it on the CPU instead
        logger.info("%s stays on CPU: faiss-gpu has no GPU version of it", factory)
        return None
    return replica


def knn_cap(limit: int, on_gpu: bool) -> int:
    """The largest k a search may ask for: ``limit`` on CPU, at most ``GPU_MAX_K`` on a GPU replica."""
    return min(limit, GPU_MAX_K) if on_gpu else limit
