"""Server settings, read from ``RETRIEVAL_*`` environment variables (or passed explicitly).

pydantic-settings gives the server the same typed, fail-early validation as the training
recipes: ``RETRIEVAL_PORT=80a`` or ``RETRIEVAL_MAX_K=0`` stops the server at start-up with a
message naming the variable, instead of surfacing on the first request.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServeSettings"]


class ServeSettings(BaseSettings):
    """Configuration of ``retrieval serve`` / ``serving.app.create_app``.

    Attributes:
        index: the index directory to serve.
        query_encoder: checkpoint directory or ``.onnx`` file embedding the queries; defaults to the
            encoder that built the index (``manifest.encoder_path``).
        runtime: force a query-encoder runtime ("torch", "onnxruntime"); chosen from the path by default.
        host: interface to bind; loopback by default so a development server is not exposed.
        port: TCP port.
        max_upload_mb: largest accepted upload, in MiB (larger requests get 413).
        default_k: hits returned when a request does not give ``k`` (lowered to ``max_k`` if only that is set).
        max_k: largest ``k`` a request may ask for (larger gets 422).
    """

    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", extra="forbid", protected_namespaces=())

    index: Path
    query_encoder: Path | None = None
    runtime: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_upload_mb: float = Field(10, gt=0)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _default_k_within_max(self) -> ServeSettings:
        if self.default_k > self.max_k:
            if "default_k" in self.model_fields_set:  # both given and contradictory: say so
                raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
            self.default_k = self.max_k  # only max_k lowered: the default follows it
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
