"""Unix-socket HTTP relay of ``/execution/*`` from task supervisors to the gateway over mTLS.

Task supervisors (forked by the runtime zygote) speak plain HTTP/1.1 to this socket; the control
process relays each request through ``send``, the agent's mTLS call, so the agent's private key
never enters a task process. The relay is deliberately narrow:

* only paths under :data:`~edge_agent.protocol.EXECUTION_PREFIX` pass; anything else (the agent
  API, dot-segment tricks such as ``/execution/../agents/v1/lease``) gets 403 and is never sent,
  so a task cannot act with the agent's identity beyond its own Execution API calls;
* only the request headers in :data:`REQUEST_HEADERS` and the response headers in
  :data:`RESPONSE_HEADERS` cross; hop-by-hop and client-chosen headers (``Host``, cookies,
  forwarding headers) stay behind;
* request bodies are capped (413), and a failed upstream call becomes a 502 with a JSON detail,
  which the Task SDK's client retries like any 5xx.

The socket is 0600 inside a 0700 directory owned by the agent user; connections are kept alive
(the Task SDK's httpx client reuses them) and each connection is served by its own thread, so
``send`` must be thread-safe (an ``httpx.Client`` is). No Airflow imports here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from edge_agent.errors import ConfigError, RequestRejected
from edge_agent.protocol import execution_target_refusal

log = logging.getLogger(__name__)

#: ``send(method, path, headers, body) -> (status, headers, body)``; ``path`` keeps the query string.
SendFn = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]
#: ``after_reply(method, path, status)``: called once the upstream's reply is on its way to the
#: task, on the connection's thread, so what it does (the agent's audit write) adds nothing to the
#: task's wait. An exception in it is logged and the connection goes on.
AfterReplyFn = Callable[[str, str, int], None]

#: Request headers relayed upstream (lower case). Everything else is dropped.
REQUEST_HEADERS = frozenset({"authorization", "airflow-api-version", "content-type", "accept", "correlation-id"})
#: Response headers relayed back. ``content-range`` carries the mapped-XCom count of
#: ``HEAD /xcoms/...`` (``XComOperations.head`` fails without it).
RESPONSE_HEADERS = frozenset({"content-type", "refreshed-api-token", "correlation-id", "content-range"})

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: An idle keep-alive connection is closed after this long, so abandoned connections free their thread.
IDLE_TIMEOUT_SECONDS = 300.0


class ForwarderError(ConfigError):
    """The forwarder cannot start: unsafe socket directory, socket in use, or bind failure."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # stop() closes live connections itself; joining a thread blocked in an upstream call would
    # make stop() wait for the upstream timeout.
    block_on_close = False

    def __init__(self, path: str, send: SendFn, max_body_bytes: int, after_reply: AfterReplyFn | None) -> None:
        self.send = send
        self.after_reply = after_reply
        self.max_body_bytes = max_body_bytes
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(path, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        # The default prints a traceback to stderr; a supervisor killed mid-request is routine.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("forwarder: client connection dropped: %s", exc)
        else:
            log.exception("forwarder: request handling failed")

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "edge-agent-forwarder"
    sys_version = ""
    timeout = IDLE_TIMEOUT_SECONDS
    server: _Server

    def do_GET(self) -> None:
        self._relay()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _relay(self) -> None:
        body = self._read_body()
        if body is None:
            return
        reason = execution_target_refusal(self.path)
        if reason is not None:
            log.warning("forwarder refused %s %s: %s", self.command, self.path[:200], reason)
            self._reply_json(403, reason)
            return
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() in REQUEST_HEADERS}
        try:
            status, resp_headers, resp_body = self.server.send(self.command, self.path, headers, body)
        except RequestRejected as exc:  # refused before leaving the agent: retrying cannot help
            self._reply_json(403, f"edge-agent forwarder: {exc}")
            return
        except Exception as exc:  # any upstream failure must reach the SDK as a retryable 5xx
            detail = f"edge-agent forwarder: upstream request failed: {type(exc).__name__}: {exc}"
            log.warning("%s %s: %s", self.command, self.path[:200], detail)
            self._reply_json(502, detail)
            return
        picked = {k.lower(): v for k, v in resp_headers.items() if k.lower() in RESPONSE_HEADERS}
        self._reply(status, picked, resp_body)
        if self.server.after_reply is not None:
            try:
                self.server.after_reply(self.command, self.path, status)
            except Exception:
                log.exception("forwarder: after-reply hook failed for %s %s", self.command, self.path[:200])

    def _read_body(self) -> bytes | None:
        """The request body, or ``None`` after replying with an error (connection then closed)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            self._reply_json(411, "chunked request bodies are not supported; send Content-Length")
            return None
        raw = self.headers.get("content-length")
        try:
            length = int(raw) if raw is not None else 0
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._reply_json(400, "invalid Content-Length")
            return None
        if length > self.server.max_body_bytes:
            # The unread body would be parsed as the next request: drop the connection.
            self.close_connection = True
            self._reply_json(413, f"request body of {length} bytes exceeds {self.server.max_body_bytes} bytes")
            return None
        return self.rfile.read(length) if length else b""

    def _reply_json(self, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        self._reply(status, {"content-type": "application/json"}, body)

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            self.send_header("content-length", str(len(body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if not no_body and self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        # The default writes to stderr via address_string(), which fails for Unix sockets.
        log.debug("forwarder: " + format, *args)


class Forwarder:
    """Serves ``/execution/*`` on a Unix socket by calling ``send`` for each request.

    ``start()`` binds and serves in a background thread; ``stop()`` (idempotent) closes the
    socket, drops live connections and removes the socket file.
    """

    def __init__(
        self,
        socket_path: Path,
        send: SendFn,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        after_reply: AfterReplyFn | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self._send = send
        self._after_reply = after_reply
        self._max_body_bytes = max_body_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            self._prepare_path()
            try:
                server = _Server(str(self.socket_path), self._send, self._max_body_bytes, self._after_reply)
            except OSError as exc:
                raise ForwarderError(f"cannot bind forwarder socket {self.socket_path}: {exc}") from exc
            # The 0700 directory already keeps others out between bind() and chmod().
            os.chmod(self.socket_path, 0o600)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, name="forwarder", kwargs={"poll_interval": 0.5}, daemon=True
            )
            self._thread.start()
            log.info("forwarder listening on %s", self.socket_path)

    def stop(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            server.shutdown()
            server.server_close()
            server.close_connections()
            if thread is not None:
                thread.join()
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Forwarder:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _prepare_path(self) -> None:
        """Make the parent directory private and remove a stale socket left by a crashed agent."""
        parent = self.socket_path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = parent.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            # A socket in a shared directory could be swapped or reached by other users.
            raise ForwarderError(
                f"forwarder socket directory {parent} must be owned by this user with mode 0700 "
                f"(found owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
            )
        try:
            st = self.socket_path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ForwarderError(f"{self.socket_path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.socket_path.unlink(missing_ok=True)  # stale: nobody is listening
            return
        finally:
            probe.close()
        raise ForwarderError(f"{self.socket_path} is in use by another process (is another agent running?)")


__all__ = ["DEFAULT_MAX_BODY_BYTES", "AfterReplyFn", "Forwarder", "ForwarderError", "REQUEST_HEADERS", "RESPONSE_HEADERS", "SendFn"]
