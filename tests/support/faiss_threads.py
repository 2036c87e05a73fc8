"""A module fixture limiting FAISS to one OpenMP thread; import it into a test module to use it."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """Small indexes gain nothing from OpenMP, and its spinning threads crawl on a busy shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
