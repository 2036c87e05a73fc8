"""Server settings, read from ``RETRIEVAL_*`` environment variables (or passed explicitly).

pydantic-settings gives the server the same typed, fail-early validation as the training
recipes: ``RETRIEVAL_PORT=80a`` or ``RETRIEVAL_MAX_K=0`` stops the server at start-up with a
message naming the variable, instead of surfacing on the first request. ``retrieval serve``
maps one flag to each field and passes only the flags given, so a flag overrides the
environment and the environment overrides the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_BATCH_MAX_SIZE", "DEFAULT_BATCH_MAX_WAIT_MS", "ServeSettings"]

#: Largest micro-batch of query images embedded in one ``encode`` call (see ``serving.api.batching``). Off (1)
#: by default: on the 2-core CPU machine ``benchmarks/bench_http.py`` measured no gain from batches of 16 (65.6
#: vs 67.2 requests/s at concurrency 16), since concurrent single-image runs already fill the cores. Raise it
#: for a GPU, where one batched forward pass is much cheaper than many.
DEFAULT_BATCH_MAX_SIZE = 1
#: How long the first image of a batch waits for company; 0 takes only what queued while the encoder was busy.
DEFAULT_BATCH_MAX_WAIT_MS = 0.0


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

    def runtime_options(self) -> dict[str, object]:
        """Keyword options for ``serving.runtimes.open_query_encoder`` (only those that were set)."""
        return {"providers": list(self.providers)} if self.providers else {}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
