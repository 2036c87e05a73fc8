"""Server settings, read from ``RETRIEVAL_*`` environment variables (or passed explicitly).

pydantic-settings gives the server the same typed, fail-early validation as the training
recipes: ``RETRIEVAL_PORT=80a`` or ``RETRIEVAL_MAX_K=0`` stops the server at start-up with a
message naming the variable, instead of surfacing on the first request. ``retrieval serve``
maps one flag to each field and passes only the flags given, so a flag overrides the
environment and the environment overrides the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "DEFAULT_BATCH_MAX_SIZE",
    "DEFAULT_BATCH_MAX_WAIT_MS",
    "DEFAULT_KEEP_ALIVE_S",
    "DEFAULT_MAX_IMAGE_MP",
    "ServeSettings",
]

#: Largest micro-batch of query images embedded in one ``encode`` call (see ``serving.api.batching``). Off (1)
#: by default: on the 2-core CPU machine ``benchmarks/bench_http.py`` measured no gain from batches of 16 (65.6
#: vs 67.2 requests/s at concurrency 16), since concurrent single-image runs already fill the cores. Raise it
#: for a GPU, where one batched forward pass is much cheaper than many.
DEFAULT_BATCH_MAX_SIZE = 1
#: How long the first image of a batch waits for company; 0 takes only what queued while the encoder was busy.
DEFAULT_BATCH_MAX_WAIT_MS = 0.0
#: Idle keep-alive connections are closed after this long. uvicorn's own default (5 s) equals httpx's pool expiry
#: (5 s), and requests/urllib3 pools never expire idle connections: a client reusing a connection just as the
#: server closes it gets a reset (2 ``ReadError``s in 10,000 requests in issue 12's probe). The server must
#: outlive its clients' idle timeouts, so the client always closes first: 75 s is above the 60 s idle timeouts
#: of nginx's upstream keep-alive and AWS/GCP load balancers (whose docs ask backends for more), which is the
#: value nginx itself uses for clients (``keepalive_timeout 75s``).
DEFAULT_KEEP_ALIVE_S = 75
#: Image queries in flight per CPU core by default. ``benchmarks/bench_load.py`` (800 requests at concurrency 32,
#: 2 cores, shared machine) measured 19.9 req/s with 1 per core, 31.1 with 2, 47.1 (p99 1.09 s) with 4 and 38.8
#: (p99 1.24 s) with no limit: a query spends part of its time outside the encoder (decoding, the thread hops,
#: the search), so a few per core keep the cores busy, while the bound keeps the rest queued in arrival order.
QUERIES_PER_CORE = 4
#: See ``retrieval.data.images.DEFAULT_MAX_UPLOAD_PIXELS``.
DEFAULT_MAX_IMAGE_MP = 50.0


class ServeSettings(BaseSettings):
    """Configuration of ``retrieval serve`` / ``serving.app.create_app``.

    Attributes:
        index: the index directory to serve.
        query_encoder: checkpoint directory or ``.onnx`` file embedding the queries; defaults to the
            encoder that built the index (``manifest.encoder_path``).
        runtime: force a query-encoder runtime ("torch", "onnxruntime", "tensorrt"); by default the first
            runtime of ``serving.runtimes`` that accepts the path.
        providers: ONNX Runtime execution providers in order of preference (``cuda``, ``cpu``, ``tensorrt``
            or full names); default CUDA when installed, then CPU. From the environment: comma-separated.
        host: interface to bind; loopback by default so a development server is not exposed.
        port: TCP port.
        max_upload_mb: largest accepted upload, in MiB (larger requests get 413).
        default_k: hits returned when a request does not give ``k`` (lowered to ``max_k`` if only that is set).
        max_k: largest ``k`` a request may ask for (larger gets 422).
        api_key: when set, every route but health, readiness, the page and the docs needs it in the
            ``X-API-Key`` header. Give it by environment (``RETRIEVAL_API_KEY``) or in a file
            (``api_key_file``), not on a command line that ``ps`` shows to every user of the machine.
        api_key_file: a file whose content (surrounding whitespace stripped) is the API key, e.g. a
            container secret; an error when ``api_key`` is given too.
        cors_origins: origins allowed to call the API from a browser (``*`` for any); empty sends no CORS
            headers at all. From the environment: a JSON list or comma-separated origins.
        batch_max_size: most query images embedded together by the micro-batcher; 1 (the default, see
            ``DEFAULT_BATCH_MAX_SIZE`` for the measurement) disables batching.
        batch_max_wait_ms: how long the first query of a batch waits for others; 0 (the default) batches
            only the queries that arrived while the encoder was busy, adding no latency to a lone query.
        warmup: run one query through the encoder and the index at start-up before ``/v1/readyz`` says ready.
        max_image_mp: largest accepted upload in megapixels, read from the image header before decoding (413).
        max_concurrent_queries: image queries decoding, embedding or searching at once; default 4 x the CPU
            cores x ``batch_max_size`` (see ``QUERIES_PER_CORE``).
        max_concurrent_decodes: uploads decoding at once (each holds a decoded image); default the CPU cores.
        max_queued_queries: image queries waiting for a place; one more gets 503 with ``Retry-After`` at once.
        queue_timeout_s: the longest a query waits for a place before 503 with ``Retry-After``.
        keep_alive_s: idle keep-alive connections are closed after this long (see ``DEFAULT_KEEP_ALIVE_S``).
        graceful_shutdown_s: on SIGTERM, how long open requests may finish before the server stops anyway.
        max_connections: open connections and requests at once (uvicorn's ``limit_concurrency``); more get 503.
        backend: the vector backend the index is expected to live in ("faiss", "qdrant"); the index's manifest
            decides, so this only checks it: naming another backend is an error at start-up. ``None``: no check.
        qdrant_url: reach the Qdrant collection of a ``qdrant`` index through this address (``http(s)://HOST:PORT``,
            a local directory, ``:memory:``) instead of the one recorded when it was built, e.g. the cluster's
            internal name; an error for an index of another backend. The API key comes from ``$QDRANT_API_KEY``.
    """

    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", extra="forbid", protected_namespaces=())

    index: Path
    query_encoder: Path | None = None
    runtime: str | None = None
    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_upload_mb: float = Field(10, gt=0)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    batch_max_size: int = Field(DEFAULT_BATCH_MAX_SIZE, ge=1, le=1024)
    batch_max_wait_ms: float = Field(DEFAULT_BATCH_MAX_WAIT_MS, ge=0, le=1000)
    warmup: bool = True
    max_image_mp: float = Field(DEFAULT_MAX_IMAGE_MP, gt=0, le=10_000)
    max_concurrent_queries: int | None = Field(None, ge=1, le=4096)
    max_concurrent_decodes: int | None = Field(None, ge=1, le=1024)
    max_queued_queries: int = Field(64, ge=0, le=100_000)
    queue_timeout_s: float = Field(5.0, gt=0, le=600)
    keep_alive_s: int = Field(DEFAULT_KEEP_ALIVE_S, ge=1, le=3600)
    graceful_shutdown_s: int = Field(20, ge=1, le=3600)
    max_connections: int = Field(1024, ge=1)
    backend: str | None = Field(None, min_length=1, max_length=64)
    qdrant_url: str | None = Field(None, min_length=1)

    @field_validator("cors_origins", "providers", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _default_k_within_max(self) -> ServeSettings:
        if self.default_k > self.max_k:
            if "default_k" in self.model_fields_set:  # both given and contradictory: say so
                raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
            self.default_k = self.max_k  # only max_k lowered: the default follows it
        return self

    @model_validator(mode="after")
    def _key_from_file(self) -> ServeSettings:
        if self.api_key_file is None:
            if self.api_key is not None and not self.api_key.get_secret_value():
                raise ValueError("api_key is empty; unset it to serve without a key")
            return self
        if self.api_key is not None:
            raise ValueError("give the API key either as api_key or as api_key_file, not both")
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc.strerror or exc}") from None
        if not key:
            raise ValueError(f"api_key_file {self.api_key_file} is empty")
        self.api_key = SecretStr(key)
        return self

    @model_validator(mode="after")
    def _backend_matches_index(self) -> ServeSettings:
        """Refuse ``backend``/``qdrant_url`` that contradict the index's manifest (read only when one is given)."""
        from indexing.index_dir import backend_overrides

        backend_overrides(self.index, self.backend, self.qdrant_url)  # BackendMismatchError is a ValueError
        return self

    def backend_options(self) -> dict[str, Any]:
        """Options overriding the index manifest's backend options (``SearchEngine.open(backend_options=...)``).

        Checked against the manifest when the settings were made (``indexing.index_dir.backend_overrides``).
        """
        return {"url": self.qdrant_url} if self.qdrant_url else {}

    def runtime_options(self) -> dict[str, object]:
        """Keyword options for ``serving.runtimes.open_query_encoder`` (only those that were set)."""
        return {"providers": list(self.providers)} if self.providers else {}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_mp * 1_000_000)

    @property
    def query_concurrency(self) -> int:
        """``max_concurrent_queries``, or its default: ``QUERIES_PER_CORE`` x CPU cores x ``batch_max_size``."""
        return self.max_concurrent_queries or QUERIES_PER_CORE * (os.cpu_count() or 1) * self.batch_max_size

    @property
    def decode_concurrency(self) -> int:
        """``max_concurrent_decodes``, or its default: the CPU cores."""
        return self.max_concurrent_decodes or os.cpu_count() or 1

    def uvicorn_options(self) -> dict[str, Any]:
        """The server timeouts and limits as ``uvicorn.Config`` keyword arguments."""
        return {
            "timeout_keep_alive": self.keep_alive_s,
            "timeout_graceful_shutdown": self.graceful_shutdown_s,
            "limit_concurrency": self.max_connections,
        }
