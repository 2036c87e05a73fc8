"""Indexing: embedding extraction, vector indexes (FAISS, Qdrant), SQLite metadata and the index directory.

The torch-free parts (opening and searching an index directory) are re-exported here for
``serving``; extraction and building need torch and live in ``indexing.extract`` and
``indexing.builder``. FAISS itself is imported only when an index is created or loaded.
"""

from indexing.errors import GranularityError, IndexFormatError, NotCalibratedError, UnknownGranularityError
from indexing.faiss_index import FaissIndex
from indexing.index_dir import IndexDirectory, open_index_dir, write_index_dir
from indexing.manifest import INDEX_FORMAT_VERSION, Manifest
from indexing.metadata import MetadataRow, MetadataStore
from indexing.results import SearchHit, SearchResults
from indexing.vector_index import VECTOR_BACKENDS, LabelFilter, VectorIndex, backend_class

__all__ = [
    "INDEX_FORMAT_VERSION",
    "VECTOR_BACKENDS",
    "FaissIndex",
    "GranularityError",
    "IndexDirectory",
    "IndexFormatError",
    "LabelFilter",
    "Manifest",
    "MetadataRow",
    "MetadataStore",
    "NotCalibratedError",
    "SearchHit",
    "SearchResults",
    "UnknownGranularityError",
    "VectorIndex",
    "backend_class",
    "open_index_dir",
    "write_index_dir",
]
