"""The node's HTTP endpoint: Prometheus ``/metrics`` and ``/healthz``, in a background thread."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pneumonode.health import Health

LOGGER = logging.getLogger(__name__)


def _handler_class(
    registry: CollectorRegistry, health: Callable[[], Health]
) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to one node's registry and health check (no shared state)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "pneumonode"
        sys_version = ""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                verdict = health()
                status = HTTPStatus.OK if verdict.ok else HTTPStatus.SERVICE_UNAVAILABLE
                body = json.dumps(verdict.as_json(), indent=2).encode("utf-8") + b"\n"
                self._send(status, body, "application/json")
            else:
                body = b"not found: try /metrics or /healthz\n"
                self._send(HTTPStatus.NOT_FOUND, body, "text/plain; charset=utf-8")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            LOGGER.debug("http %s: " + format, self.address_string(), *args)

    return Handler


class HttpEndpoint:
    """Serves ``/metrics`` and ``/healthz`` on ``host:port`` until :meth:`stop`.

    Parameters
    ----------
    host, port:
        Where to listen; port 0 picks a free one (see :attr:`address`).
    registry:
        The node's Prometheus registry.
    health:
        Called for every ``/healthz`` request: 200 with the checks when healthy, else 503.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], Health],
    ) -> None:
        self._host = host
        self._port = port
        self._handler = _handler_class(registry, health)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound address while serving, else None."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; returns the bound address.

        Raises
        ------
        OSError
            When the address cannot be bound (port in use, not permitted).
        """
        server = ThreadingHTTPServer((self._host, self._port), self._handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True
        )
        self._thread.start()
        address = self.address
        assert address is not None
        LOGGER.info("metrics and health on http://%s:%d/", *address)
        return address

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
