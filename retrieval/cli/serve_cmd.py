"""``retrieval serve``: the HTTP search API.

Every server setting has a flag and a ``RETRIEVAL_*`` environment variable (``serving.settings``).
Only the flags actually given are passed on, so a flag overrides the environment and the
environment overrides the defaults. The API key has no flag of its own on purpose: a command
line is visible to every user of the machine (``ps``), so the key comes from ``RETRIEVAL_API_KEY``
or from a file (``--api-key-file``, e.g. a container secret).
"""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.backend_options import BACKEND_HELP, QDRANT_URL_HELP
from retrieval.cli.common import user_errors


def serve(
    index: Path | None = typer.Option(None, "--index", help="Index directory to serve (env RETRIEVAL_INDEX)."),
    query_encoder: Path | None = typer.Option(
        None,
        "--query-encoder",
        help="Checkpoint dir, .onnx/.ort file or TensorRT engine; default: the encoder that built the index "
        "(env RETRIEVAL_QUERY_ENCODER).",
    ),
    runtime: str | None = typer.Option(
        None, "--runtime", help="Force a query-encoder runtime (torch, onnxruntime, ...) (env RETRIEVAL_RUNTIME)."
    ),
    provider: list[str] | None = typer.Option(
        None,
        "--provider",
        help="ONNX Runtime execution provider (cuda, cpu, tensorrt); repeat in order of preference; default CUDA "
        "when installed, then CPU (env RETRIEVAL_PROVIDERS, comma-separated).",
    ),
    host: str | None = typer.Option(None, "--host", help="Interface to bind; default 127.0.0.1 (env RETRIEVAL_HOST)."),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="TCP port; default 8000 (env RETRIEVAL_PORT)."
    ),
    max_upload_mb: float | None = typer.Option(
        None, "--max-upload-mb", help="Largest upload in MiB; default 10 (env RETRIEVAL_MAX_UPLOAD_MB)."
    ),
    default_k: int | None = typer.Option(
        None, "--default-k", help="Hits when a request gives no k; default 10 (env RETRIEVAL_DEFAULT_K)."
    ),
    max_k: int | None = typer.Option(
        None, "--max-k", help="Largest k a request may ask; default 100 (env RETRIEVAL_MAX_K)."
    ),
    api_key_file: Path | None = typer.Option(
        None,
        "--api-key-file",
        help="File holding the API key clients must send as X-API-Key (env RETRIEVAL_API_KEY_FILE, or the key "
        "itself in RETRIEVAL_API_KEY); there is no --api-key flag, since ps shows command lines to every user.",
    ),
    cors_origin: list[str] | None = typer.Option(
        None,
        "--cors-origin",
        help="Origin allowed to call the API from a browser; repeat for several, '*' for any; default none "
        "(env RETRIEVAL_CORS_ORIGINS, comma-separated).",
    ),
    batch_max_size: int | None = typer.Option(
        None,
        "--batch-max-size",
        help="Most query images embedded together (16 suits a GPU); default 1: no batching "
        "(env RETRIEVAL_BATCH_MAX_SIZE).",
    ),
    batch_max_wait_ms: float | None = typer.Option(
        None,
        "--batch-max-wait-ms",
        help="How long a query waits for others to batch with; default 0 (env RETRIEVAL_BATCH_MAX_WAIT_MS).",
    ),
    warmup: bool | None = typer.Option(
        None,
        "--warmup/--no-warmup",
        help="Run one query before /v1/readyz says ready; default on (env RETRIEVAL_WARMUP).",
    ),
    max_image_mp: float | None = typer.Option(
        None,
        "--max-image-mp",
        help="Largest upload in megapixels, checked before decoding; default 50 (env RETRIEVAL_MAX_IMAGE_MP).",
    ),
    max_concurrent_queries: int | None = typer.Option(
        None,
        "--max-concurrent-queries",
        help="Image queries running at once; default 4 x CPU cores x batch size "
        "(env RETRIEVAL_MAX_CONCURRENT_QUERIES).",
    ),
    max_concurrent_decodes: int | None = typer.Option(
        None,
        "--max-concurrent-decodes",
        help="Uploads decoding at once; default the CPU cores (env RETRIEVAL_MAX_CONCURRENT_DECODES).",
    ),
    max_queued_queries: int | None = typer.Option(
        None,
        "--max-queued-queries",
        help="Image queries waiting for a place; more get 503 + Retry-After; default 64 "
        "(env RETRIEVAL_MAX_QUEUED_QUERIES).",
    ),
    queue_timeout_s: float | None = typer.Option(
        None,
        "--queue-timeout-s",
        help="Longest wait for a place before 503 + Retry-After; default 5 (env RETRIEVAL_QUEUE_TIMEOUT_S).",
    ),
    keep_alive_s: int | None = typer.Option(
        None,
        "--keep-alive-s",
        help="Idle keep-alive connections close after this many seconds; default 75, above the 60 s of common "
        "proxies and load balancers (env RETRIEVAL_KEEP_ALIVE_S).",
    ),
    graceful_shutdown_s: int | None = typer.Option(
        None,
        "--graceful-shutdown-s",
        help="On SIGTERM, seconds open requests may take to finish; default 20 (env RETRIEVAL_GRACEFUL_SHUTDOWN_S).",
    ),
    max_connections: int | None = typer.Option(
        None,
        "--max-connections",
        help="Open connections and requests at once, more get 503; default 1024 (env RETRIEVAL_MAX_CONNECTIONS).",
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        metavar="faiss|qdrant",
        help=f"{BACKEND_HELP} Here only checked against the index's manifest, which decides (env RETRIEVAL_BACKEND).",
    ),
    qdrant_url: str | None = typer.Option(
        None, "--qdrant-url", metavar="URL", help=f"{QDRANT_URL_HELP} (env RETRIEVAL_QDRANT_URL)"
    ),
) -> None:
    """Serve the search API (POST /v1/search, /v1/search/embedding; GET /v1/index, /metrics, /docs) with uvicorn."""
    with user_errors():
        from pydantic import ValidationError

        from retrieval.config import ConfigError, format_validation_error
        from serving.app import serve as run_server
        from serving.settings import ServeSettings

        given = {
            "index": index,
            "query_encoder": query_encoder,
            "runtime": runtime,
            "providers": provider or None,
            "host": host,
            "port": port,
            "max_upload_mb": max_upload_mb,
            "default_k": default_k,
            "max_k": max_k,
            "api_key_file": api_key_file,
            "cors_origins": cors_origin or None,
            "batch_max_size": batch_max_size,
            "batch_max_wait_ms": batch_max_wait_ms,
            "warmup": warmup,
            "max_image_mp": max_image_mp,
            "max_concurrent_queries": max_concurrent_queries,
            "max_concurrent_decodes": max_concurrent_decodes,
            "max_queued_queries": max_queued_queries,
            "queue_timeout_s": queue_timeout_s,
            "keep_alive_s": keep_alive_s,
            "graceful_shutdown_s": graceful_shutdown_s,
            "max_connections": max_connections,
            "backend": backend,
            "qdrant_url": qdrant_url,
        }
        try:  # RETRIEVAL_* environment variables fill in what no flag gave, and are validated here too
            settings = ServeSettings(**{name: value for name, value in given.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "invalid server settings:")) from None
        run_server(settings)
