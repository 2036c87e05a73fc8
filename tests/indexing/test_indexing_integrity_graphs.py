"""The HNSW link check reaches every graph an index type holds: its own, a refine base's, an IVF coarse quantiser's."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexing.errors import IndexFormatError
from indexing.faiss_index import FaissIndex
from indexing.integrity import check_graph, stores_exact_vectors


def _filled(factory: str) -> FaissIndex:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1200, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = FaissIndex(32, factory, device="cpu")
    index.train(vectors)
    index.add(vectors, np.arange(1200, dtype=np.int64))
    return index


def _graph_of(index: FaissIndex):
    inner = faiss.downcast_index(index.faiss_index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.downcast_index(inner.quantizer)
    return inner.hnsw


@pytest.mark.parametrize("factory", ["HNSW16", "HNSW16_SQ8,RFlat", "IVF16_HNSW16,Flat", "IVF16_HNSW16,PQ16x4fs,RFlat"])
def test_a_link_outside_the_stored_nodes_is_refused_in_every_graph(factory):
    index = _filled(factory)
    check_graph(index, "test index")  # intact: passes
    hnsw = _graph_of(index)
    links = faiss.vector_to_array(hnsw.neighbors)
    links[np.flatnonzero(links >= 0)[0]] = 10**6
    faiss.copy_array_to_vector(links, hnsw.neighbors)
    with pytest.raises(IndexFormatError, match="links to nodes outside"):
        check_graph(index, "test index")


def test_a_refine_index_over_full_floats_counts_as_exact_storage():
    assert stores_exact_vectors(_filled("IVF16_HNSW16,PQ16x4fs,RFlat"))
    assert not stores_exact_vectors(_filled("IVF16_HNSW16,PQ16x4fs,Refine(SQ8)"))
