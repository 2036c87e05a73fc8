"""``retrieval serve``: the HTTP search API."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import user_errors


def serve(
    index: Path = typer.Option(..., "--index", help="Index directory to serve."),
    query_encoder: Path | None = typer.Option(
        None, "--query-encoder", help="Checkpoint dir or .onnx file; default: the encoder that built the index."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
) -> None:
    """Serve POST /v1/search (multipart image upload) and GET /v1/healthz with uvicorn."""
    with user_errors():
        from pydantic import ValidationError

        from retrieval.config import ConfigError, format_validation_error
        from serving.app import serve as run_server
        from serving.settings import ServeSettings

        try:  # RETRIEVAL_* environment variables are read and validated here too
            settings = ServeSettings(index=index, query_encoder=query_encoder, host=host, port=port)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "invalid server settings:")) from None
        run_server(settings)
