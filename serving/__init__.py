"""Serving: ONNX export, query-encoder runtimes, the search engine and the HTTP API.

Import the submodules directly (``serving.export``, ``serving.runtimes``, ``serving.engine``,
``serving.app``...): this package file imports nothing, so that importing one part of serving
never pulls in torch, ONNX Runtime or FastAPI for another.
"""

__all__: list[str] = []
