"""Run Python in a fresh process with a bare environment: what a torch-free deployment would see.

The child gets only ``PATH``, one OpenMP thread and the project on ``PYTHONPATH``, so nothing imported by the
test process (torch above all) leaks into what the child imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "run_isolated"]

ROOT = Path(__file__).resolve().parents[2]


def run_isolated(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from the project root in a bare environment; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        check=False,
    )
