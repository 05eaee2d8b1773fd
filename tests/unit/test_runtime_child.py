"""The supervisor's transport to the forwarder: plain HTTP on the Unix socket, no TLS setup per job.

Real forwarder on a real Unix socket; only the gateway behind its ``send`` is a function here.
"""

from __future__ import annotations

import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.forwarder import Forwarder
from edge_agent.runtime import child


@pytest.fixture()
def forwarder() -> Iterator[tuple[Forwarder, list[tuple[str, str]]]]:
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def send(method: str, path: str, headers: dict[str, str], body: bytes):
        with lock:
            seen.append((method, path))
        return 200, {"content-type": "application/json"}, b'{"ok": true}'

    # Short path: AF_UNIX socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="rtc-", dir="/tmp") as tmp:
        with Forwarder(Path(tmp) / "run" / "fwd.sock", send) as fwd:
            yield fwd, seen


@pytest.fixture()
def no_default_contexts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ssl.create_default_context call (what httpx builds per transport by default)."""
    calls: list[str] = []
    real = ssl.create_default_context

    def recording(*args, **kwargs):
        calls.append("create_default_context")
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recording)
    return calls


@pytest.mark.parametrize("prepared", [True, False], ids=["zygote-prepared", "unprepared"])
def test_transport_reaches_the_forwarder_without_building_a_tls_context(
    forwarder, no_default_contexts: list[str], monkeypatch: pytest.MonkeyPatch, prepared: bool
) -> None:
    fwd, seen = forwarder
    monkeypatch.setattr(child, "_forwarder_tls", None)
    if prepared:
        child.prepare()
    with httpx.Client(base_url=child.EXECUTION_BASE_URL, transport=child.forwarder_transport(str(fwd.socket_path))) as c:
        for _ in range(3):
            r = c.get("task-instances/ti-1/previous-successful-dagrun")
            assert r.status_code == 200 and r.json() == {"ok": True}
    assert seen == [("GET", "/execution/task-instances/ti-1/previous-successful-dagrun")] * 3
    assert no_default_contexts == []


def test_prepared_context_is_shared_by_every_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child, "_forwarder_tls", None)
    child.prepare()
    first = child.forwarder_transport("/nonexistent-a")
    second = child.forwarder_transport("/nonexistent-b")
    contexts = [t._pool._ssl_context for t in (first, second)]
    assert contexts[0] is contexts[1] is child._forwarder_tls


def test_the_unused_context_fails_closed_should_the_url_ever_be_https() -> None:
    # The transport never speaks TLS; if it did, nothing must pass unverified.
    ctx = child._unused_tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs() == []


def test_cancel_carries_the_agents_cancel_grace(monkeypatch) -> None:
    """--cancel-grace reaches the zygote, which kills the job's group after that many seconds."""
    from edge_agent.runtime import CANCEL_GRACE_SECONDS, Runtime
    from edge_agent.runtime.zygote import _grace

    sent: list[dict] = []
    runtime = Runtime.__new__(Runtime)
    runtime._jobs_lock = __import__("threading").Lock()
    runtime._jobs = {"j1": object()}
    monkeypatch.setattr(runtime, "_send", sent.append, raising=False)
    assert runtime.cancel("j1", "drain grace expired", grace=42.0)
    assert runtime.cancel("j1", "again")
    assert sent == [
        {"op": "cancel", "job_id": "j1", "reason": "drain grace expired", "grace": 42.0},
        {"op": "cancel", "job_id": "j1", "reason": "again"},
    ]
    assert runtime.cancel("unknown", "x") is False
    # What the zygote accepts: a sane number of seconds; anything else falls back to the default.
    assert _grace(42.0) == 42.0 and _grace(0) == 0.0
    for bad in (None, -1, "5", True, float("nan"), 10**9):
        assert _grace(bad) == CANCEL_GRACE_SECONDS
