"""The `/metrics` endpoint: Prometheus' exposition of the server's and vLLM's metrics, on its own
port, optionally behind a bearer token and/or TLS (as Prometheus scrape configs support:
`authorization: {type: Bearer}`, `scheme: https`).

What it exposes: every adapter id that was served (the `adapter` label, capped per tenant) and
every tenant name (the `tenant` label), with request counts and latencies, plus vLLM's engine
metrics. Without a token anyone who reaches the port reads them; deploy/ keeps the port inside
the cluster (NetworkPolicy), and `--metrics-bearer-token-file` / `--metrics-tls-cert` close it.
The token is checked before anything else (constant time, O(1) per request).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the server's log


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class MetricsServer:
    """Serves `registry` on `host:port` in a background thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *, bearer_token_file: Path | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None) -> None:
        self._expected = None
        if bearer_token_file is not None:
            token = Path(bearer_token_file).read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"metrics bearer token file {bearer_token_file} is empty")
            self._expected = _digest(token)
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if self._expected is not None and not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"a bearer token is required\n"]
            return metrics(environ, start_response)

        self.httpd = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        if certfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="mora-metrics", daemon=True)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._expected or b"")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
