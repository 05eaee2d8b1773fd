"""A task process abusing the agent's forwarder socket to act with the agent's identity.

The real :class:`edge_agent.forwarder.Forwarder` relays through the real ``AgentAPI`` over mTLS to
the real gateway, as in ``edge-agent run``; the relay is wrapped by a recorder. Requests are written
as raw bytes on the Unix socket, so no client library normalises the dot segments away first.
Every attack must be answered 403 by the forwarder, never reach the recorder, and leave the
agent's queued job alone (no lease was taken with the agent's certificate).
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from secsupport import enroll, job_row

from edge_agent.client import AgentAPI
from edge_agent.forwarder import Forwarder

LEASE_BODY = json.dumps({"free_slots": 1, "wait_seconds": 0}).encode()

ATTACKS = [
    "/agents/v1/lease",
    "/execution/../agents/v1/lease",
    "/execution/./../agents/v1/lease",
    "/execution/%2e%2e/agents/v1/lease",
    "/execution/%2E%2E/agents/v1/lease",
    "/execution/.%2e/agents/v1/lease",
    "/execution/%2e./agents/v1/lease",
    "/execution/..%2fagents/v1/lease",
    "/execution/%2e%2e%2fagents%2fv1%2flease",
    "/execution/..\\agents/v1/lease",
    "/execution/%5c..%5cagents/v1/lease",
    "/execution/x/../../agents/v1/lease",
    "/Execution/../agents/v1/lease",
    "/execution",
    "//127.0.0.1/agents/v1/lease",
    "https://127.0.0.1/agents/v1/lease",
    "http://gateway.invalid/execution/../agents/v1/lease",
    "agents/v1/lease",
]


class Recorder:
    """The forwarder's ``send``: records each call, then relays it with the agent's real client.

    ``wire`` records what that client actually sent to the gateway (an httpx request hook).
    """

    def __init__(self) -> None:
        self.api: AgentAPI | None = None
        self.calls: list[tuple[str, str]] = []
        self.wire: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        with self._lock:
            self.calls.append((method, path))
        assert self.api is not None
        return self.api.execution_request(method, path, headers, body)

    def on_wire(self, request: httpx.Request) -> None:
        with self._lock:
            self.wire.append((request.method, request.url.raw_path.decode()))


@pytest.fixture
def relay(gateway, tmp_path) -> Iterator[tuple[Forwarder, Recorder, str, object]]:
    agent = enroll(gateway, tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    recorder = Recorder()
    api = AgentAPI(gateway.client(agent, event_hooks={"request": [recorder.on_wire]}))
    recorder.api = api
    base = Path(tempfile.mkdtemp(prefix="secfwd-", dir="/tmp"))  # AF_UNIX paths are short
    forwarder = Forwarder(base / "run" / "fwd.sock", recorder)
    forwarder.start()
    try:
        yield forwarder, recorder, job_id, gateway
    finally:
        forwarder.stop()
        api.close()
        shutil.rmtree(base)


def raw_request(sock_path: Path, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one HTTP/1.1 request exactly as written; returns (status, raw response)."""
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: edge-agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    status = int(raw.split(b" ", 2)[1])
    return status, raw


@pytest.mark.parametrize("target", ATTACKS)
def test_forwarder_relays_nothing_but_the_execution_api(relay, target):
    forwarder, recorder, job_id, gw = relay
    before = job_row(gw, job_id)
    status, raw = raw_request(forwarder.socket_path, "POST", target, LEASE_BODY)
    assert status in (400, 403), raw[:300]
    assert recorder.calls == [] and recorder.wire == []
    assert job_row(gw, job_id) == before


def test_forwarder_relays_the_execution_api_to_the_real_gateway(relay):
    # Control: the same socket and relay do reach the gateway for a legitimate path.
    forwarder, recorder, job_id, gw = relay
    status, raw = raw_request(forwarder.socket_path, "GET", "/execution/health")
    assert status == 200, raw[:300]
    assert recorder.calls == recorder.wire == [("GET", "/execution/health")]
    assert job_row(gw, job_id)["state"] == "queued"


def test_double_encoded_dot_segments_stay_inside_the_execution_mount(relay):
    # Relayed as written (one decoding leaves '%2e%2e', not '..'); the gateway decodes once, so
    # the request lands under /execution and is refused there, never at the agent API.
    forwarder, recorder, job_id, gw = relay
    before = job_row(gw, job_id)
    status, raw = raw_request(forwarder.socket_path, "POST", "/execution/%252e%252e/agents/v1/lease", LEASE_BODY)
    assert status in (403, 404), raw[:300]
    assert all(path.startswith("/execution/") for _, path in recorder.wire)
    assert job_row(gw, job_id) == before


def test_semicolon_dot_segment_never_reaches_the_agent_api(relay):
    # '..;' is a dot segment for servers that strip path parameters (Tomcat): the forwarder and the
    # agent's client both refuse it, so nothing leaves for the agent API.
    forwarder, recorder, job_id, gw = relay
    before = job_row(gw, job_id)
    status, raw = raw_request(forwarder.socket_path, "POST", "/execution/..;/agents/v1/lease", LEASE_BODY)
    assert status >= 400, raw[:300]
    assert all(not path.startswith("/agents/") for _, path in recorder.wire)
    assert recorder.wire == []
    assert job_row(gw, job_id) == before
