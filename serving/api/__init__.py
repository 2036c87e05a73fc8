"""The HTTP API's parts: routers, request/response schemas, micro-batching, metrics, security and docs.

``serving.app.create_app`` assembles them. This file imports nothing, so that importing one router
does not pull in the others.
"""

__all__: list[str] = []
