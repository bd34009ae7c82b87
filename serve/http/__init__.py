"""The OpenAI-compatible HTTP API of `mora-serve` (FastAPI on uvicorn, in the server's event loop)."""

from serve.http.app import HTTP_STATUS, HttpServer, build_app

__all__ = ["HTTP_STATUS", "HttpServer", "build_app"]
