"""``/healthz``, ``/readyz`` and ``/metrics`` on a local port (off unless ``--metrics-port`` is given).

* ``/healthz``: 200 while the control process is alive and its loops make progress; 503 otherwise.
  A gateway outage does not make the agent unhealthy: restarting it would only kill its tasks.
* ``/readyz``: 200 while the agent is serving and would take work (registered, runtime up, gateway
  reachable, not draining); 503 with the reason otherwise.
* ``/metrics``: Prometheus text (``metrics.py``).

The server binds 127.0.0.1 unless told otherwise: it answers without authentication, and what it
says (queues, job counts) is for the machine's own monitoring. Binding another address is allowed
(a Prometheus scraping a pod's IP) and logged as a warning. Each answer is a small JSON or text
body computed from the agent's in-memory state; nothing here touches the network or the disk.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ObservabilityServer:
    """A tiny HTTP server in a daemon thread; ``stop()`` closes the socket and joins the thread."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        health: Callable[[], Check],
        ready: Callable[[], Check],
        metrics: Callable[[], str],
    ) -> None:
        self.host = host
        self.requested_port = port
        self._health, self._ready, self._metrics = health, ready, metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the observability server is not running")
        return int(self._server.server_address[1])

    def start(self) -> "ObservabilityServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "edge-agent"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/healthz":
                        self._check(owner._health())
                    elif path == "/readyz":
                        self._check(owner._ready())
                    elif path == "/metrics":
                        self._send(200, owner._metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
                    else:
                        self._json(404, {"error": f"no such endpoint {path!r}; try /healthz, /readyz or /metrics"})
                except Exception as exc:  # a broken probe must answer 500, not hang the scraper
                    log.exception("observability endpoint %s failed", path)
                    self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

            def _check(self, check: Check) -> None:
                self._json(200 if check.ok else 503, {"ok": check.ok, "reason": check.reason})

            def _json(self, code: int, body: dict) -> None:
                self._send(code, (json.dumps(body) + "\n").encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("observability: " + format, *args)

        try:
            self._server = _Server((self.host, self.requested_port), Handler)
        except OSError as exc:
            from edge_agent.errors import ConfigError

            raise ConfigError(f"cannot serve health and metrics on {self.host}:{self.requested_port}: "
                              f"{exc.strerror or exc}") from None
        if not _is_loopback(self.host):
            log.warning("health and metrics are served on %s:%d, reachable from other machines without "
                        "authentication", self.host, self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="observability", daemon=True)
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["Check", "ObservabilityServer"]
