"""sd_notify against a real Unix datagram socket, the way systemd's manager receives it."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.sdnotify import MAX_STATUS, Notifier, Watchdog


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield path, sock
    sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False
    Watchdog(n).start().stop()  # no thread, returns at once


def test_ready_status_stopping_and_watchdog_arrive_as_datagrams(notify_socket) -> None:
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready("serving 4 slots")
    assert recv(sock) == ["READY=1", "STATUS=serving 4 slots"]
    assert n.status("multi\nline   status")
    assert recv(sock) == ["STATUS=multi line status"]
    assert n.stopping("draining 2 tasks")
    assert recv(sock) == ["STOPPING=1", "STATUS=draining 2 tasks"]
    assert n.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]


def test_long_status_is_cut_to_one_short_line(notify_socket) -> None:
    path, sock = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": path}).status("x" * 1000)
    (line,) = recv(sock)
    assert len(line) == len("STATUS=") + MAX_STATUS


def test_abstract_socket_address() -> None:
    name = f"edge-agent-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(30)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(sock) == ["READY=1"]
    finally:
        sock.close()


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert n.ready() is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_the_named_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    # A child that inherited the service's environment must not ping on the agent's behalf.
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}, pid=4242).watchdog_interval is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "junk"}).watchdog_interval is None


def test_watchdog_pings_only_while_healthy(notify_socket) -> None:
    path, sock = notify_socket
    calls = 0
    lock = threading.Lock()

    def healthy() -> bool:
        nonlocal calls
        with lock:
            calls += 1
            # Unhealthy twice, then a probe that raises, then healthy.
            if calls == 3:
                raise RuntimeError("probe broke")
            return calls > 3

    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # ping every 10 ms
    dog = Watchdog(n, healthy).start()
    try:
        assert recv(sock) == ["WATCHDOG=1"]
        with lock:
            assert calls >= 4  # the first ping came only after the probe said healthy
        assert recv(sock) == ["WATCHDOG=1"]
    finally:
        dog.stop()
    assert dog.skipped == 3
    assert dog.pings >= 2
