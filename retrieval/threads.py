"""One setting for how many CPU threads the engine computes with: ``--threads N`` or ``RETRIEVAL_THREADS``.

Torch, FAISS (OpenMP) and ONNX Runtime each start one worker thread per core by default. On a machine shared with
other jobs that is the slow choice: OpenMP workers spin while they wait for cores the other jobs hold, and a 2-core
box can run several times slower than with one or two threads. The limit is set through the environment before the
libraries start (``OMP_NUM_THREADS`` and friends, read once when OpenMP starts), applied to the libraries a process
has already imported, and read back by the code that opens ONNX Runtime sessions (which ignores ``OMP_NUM_THREADS``).

Importing this module imports nothing heavy, so the torch-free ONNX serving path stays torch-free.
"""

from __future__ import annotations

import os
import sys

__all__ = ["THREADS_ENV", "compute_threads", "limit_compute_threads"]

#: The environment variable holding the thread limit; ``--threads`` writes it.
THREADS_ENV = "RETRIEVAL_THREADS"
#: Variables the numeric libraries read when their thread pools start.
_LIBRARY_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def compute_threads() -> int | None:
    """The thread limit set by ``--threads`` or ``RETRIEVAL_THREADS``, or ``None`` when none is set.

    Raises:
        ValueError: ``RETRIEVAL_THREADS`` is set to something other than a positive integer.
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return value


def limit_compute_threads(threads: int) -> None:
    """Compute with at most ``threads`` CPU threads in this process and the processes it starts.

    Raises:
        ValueError: ``threads`` is not a positive integer.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    os.environ[THREADS_ENV] = str(threads)
    for name in _LIBRARY_ENVS:
        os.environ[name] = str(threads)
    # Libraries already imported have started their pools; tell them directly (never import them here).
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)
    faiss = sys.modules.get("faiss")
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(threads)
