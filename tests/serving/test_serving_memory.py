"""The serving process caps glibc's malloc arenas (flat RSS under load), unless the operator set it already."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from serving.memory import limit_malloc_arenas; print(limit_malloc_arenas())"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arenas_are_capped_on_glibc_and_an_operator_setting_wins():
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert capped.stdout.strip() == "True"
    kept = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True, text=True, check=True
    )
    assert kept.stdout.strip() == "False"
