"""The Unix-socket forwarder: real server, real httpx client over the socket, fake upstream ``send``."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from edge_agent.forwarder import Forwarder, ForwarderError
from edge_agent.protocol import execution_target_refusal


class FakeUpstream:
    """Records every relayed call and answers with a configurable reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str], bytes]] = []
        self.reply: tuple[int, dict[str, str], bytes] = (200, {"content-type": "application/json"}, b"{}")
        self.error: Exception | None = None
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        with self.lock:
            self.calls.append((method, path, headers, body))
        if self.error is not None:
            raise self.error
        return self.reply


@pytest.fixture()
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture()
def sock_path() -> Path:
    # AF_UNIX paths are limited to ~107 bytes and pytest's tmp_path can be longer.
    base = Path(tempfile.mkdtemp(prefix="fwd-", dir="/tmp"))
    yield base / "run" / "fwd.sock"
    shutil.rmtree(base)


@pytest.fixture()
def forwarder(sock_path: Path, upstream: FakeUpstream):
    fwd = Forwarder(sock_path, upstream)
    fwd.start()
    yield fwd
    fwd.stop()


def client_for(path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://edge-agent/execution/")


def test_passthrough_and_header_filtering(forwarder: Forwarder, upstream: FakeUpstream) -> None:
    upstream.reply = (
        201,
        {
            "Content-Type": "application/json",
            "Refreshed-API-Token": "new-token",
            "correlation-id": "c-1",
            "Set-Cookie": "session=leak",
            "X-Internal": "nope",
        },
        b'{"ok": true}',
    )
    with client_for(forwarder.socket_path) as client:
        resp = client.patch(
            "task-instances/abc/run?x=1",
            content=b'{"pid": 1}',
            headers={
                "authorization": "Bearer task-token",
                "airflow-api-version": "2026-06-30",
                "content-type": "application/json",
                "accept": "application/json",
                "correlation-id": "c-1",
                "cookie": "a=b",
                "x-forwarded-for": "1.2.3.4",
                "x-client-cert": "forged",
            },
        )
    assert resp.status_code == 201
    assert resp.json() == {"ok": True}
    assert resp.headers["refreshed-api-token"] == "new-token"
    assert resp.headers["correlation-id"] == "c-1"
    assert "set-cookie" not in resp.headers and "x-internal" not in resp.headers

    [(method, path, headers, body)] = upstream.calls
    assert (method, path, body) == ("PATCH", "/execution/task-instances/abc/run?x=1", b'{"pid": 1}')
    assert headers == {
        "authorization": "Bearer task-token",
        "airflow-api-version": "2026-06-30",
        "content-type": "application/json",
        "accept": "application/json",
        "correlation-id": "c-1",
    }


def test_head_keeps_content_range_and_204_has_no_body(forwarder: Forwarder, upstream: FakeUpstream) -> None:
    with client_for(forwarder.socket_path) as client:
        upstream.reply = (200, {"Content-Range": "map_indexes 3"}, b"")
        resp = client.head("xcoms/d/r/t/k")
        assert resp.headers["content-range"] == "map_indexes 3"
        upstream.reply = (204, {}, b"")
        resp = client.put("task-instances/abc/heartbeat", content=b"{}")
        assert resp.status_code == 204 and resp.content == b""
        # the connection is still usable after a bodiless reply
        upstream.reply = (200, {"content-type": "application/json"}, b"[1]")
        assert client.get("variables/x").json() == [1]


@pytest.mark.parametrize(
    "target",
    [
        "/agents/v1/lease",
        "/execution",
        "/execution/../agents/v1/lease",
        "/execution/%2e%2e/agents/v1/lease",
        "/execution/./x",
        "/executionx/y",
    ],
)
def test_non_execution_paths_refused_and_never_sent(
    forwarder: Forwarder, upstream: FakeUpstream, target: str
) -> None:
    # Raw socket: httpx would normalise dot segments before sending, a hostile task need not.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(forwarder.socket_path))
        s.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403"), data[:100]
    assert b'"detail"' in data
    assert upstream.calls == []


def test_refusal_reason_accepts_execution_paths() -> None:
    assert execution_target_refusal("/execution/task-instances/1/run") is None
    assert execution_target_refusal("/execution/xcoms/d/r/t/k?map_index=1") is None
    assert execution_target_refusal("http://evil/execution/x") is not None


def test_keep_alive_reuses_one_connection(forwarder: Forwarder, upstream: FakeUpstream) -> None:
    socks = []  # kept referenced so a new socket cannot reuse an old one's identity
    with client_for(forwarder.socket_path) as client:
        for i in range(5):
            resp = client.get(f"variables/v{i}")
            assert resp.status_code == 200
            socks.append(resp.extensions["network_stream"].get_extra_info("socket"))
    assert all(s is socks[0] for s in socks)
    assert len(upstream.calls) == 5


def test_upstream_failure_is_502_with_detail(forwarder: Forwarder, upstream: FakeUpstream) -> None:
    upstream.error = httpx.ConnectError("gateway unreachable")
    with client_for(forwarder.socket_path) as client:
        resp = client.get("variables/x")
        assert resp.status_code == 502
        assert "upstream request failed" in resp.json()["detail"]
        assert "gateway unreachable" in resp.json()["detail"]
        upstream.error = None
        assert client.get("variables/x").status_code == 200  # the connection survives a 502


def test_oversized_body_is_413_and_not_sent(sock_path: Path, upstream: FakeUpstream) -> None:
    with Forwarder(sock_path, upstream, max_body_bytes=1024) as fwd, client_for(fwd.socket_path) as client:
        resp = client.post("xcoms/d/r/t/k", content=b"x" * 2048)
        assert resp.status_code == 413
        assert client.post("xcoms/d/r/t/k", content=b"x" * 10).status_code == 200
    assert [c[3] for c in upstream.calls] == [b"x" * 10]


def test_socket_and_directory_modes_and_stop_removes_socket(sock_path: Path, upstream: FakeUpstream) -> None:
    fwd = Forwarder(sock_path, upstream)
    fwd.start()
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    fwd.stop()
    fwd.stop()  # idempotent
    assert not sock_path.exists()


def test_stale_socket_is_replaced_live_one_is_not(sock_path: Path, upstream: FakeUpstream) -> None:
    sock_path.parent.mkdir(mode=0o700, parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # file stays, nobody listens
    with Forwarder(sock_path, upstream) as fwd:
        with pytest.raises(ForwarderError, match="in use"):
            Forwarder(sock_path, upstream).start()
        with client_for(fwd.socket_path) as client:
            assert client.get("health").status_code == 200


def test_refuses_shared_directory(sock_path: Path, upstream: FakeUpstream) -> None:
    sock_path.parent.mkdir()
    os.chmod(sock_path.parent, 0o755)
    with pytest.raises(ForwarderError, match="0700"):
        Forwarder(sock_path, upstream).start()


def test_stop_closes_idle_keepalive_connections(sock_path: Path, upstream: FakeUpstream) -> None:
    fwd = Forwarder(sock_path, upstream)
    fwd.start()
    client = client_for(sock_path)
    assert client.get("health").status_code == 200  # leaves an idle keep-alive connection
    fwd.stop()
    with pytest.raises(httpx.TransportError):
        client.get("health")
    client.close()


def test_after_reply_sees_each_relayed_answer_once_it_is_sent(sock_path: Path, upstream: FakeUpstream) -> None:
    seen: list[tuple[str, str, int]] = []
    replied = threading.Event()

    def after_reply(method: str, path: str, status: int) -> None:
        # The task already has its answer: the client below got it before this returns.
        assert replied.wait(10)
        seen.append((method, path, status))
        if path.endswith("/boom"):
            raise RuntimeError("a broken hook must not break the connection")

    with Forwarder(sock_path, upstream, after_reply=after_reply) as fwd, client_for(fwd.socket_path) as client:
        upstream.reply = (409, {}, b"{}")
        assert client.patch("task-instances/t1/run").status_code == 409
        replied.set()
        assert client.get("boom").status_code == 409  # same connection, served after the hook
        assert client.get("health").status_code == 409  # ... and after the failing one
        assert client.get("../agents/v1/lease").status_code == 403  # refused before upstream: no hook
    assert seen == [("PATCH", "/execution/task-instances/t1/run", 409), ("GET", "/execution/boom", 409),
                    ("GET", "/execution/health", 409)]
