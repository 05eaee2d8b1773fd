"""``scripts/tcpproxy.py``: byte-transparent forwarding, blackhole partitions, heal, stop, and TLS through it.

Real sockets on 127.0.0.1 only. The test holds both ends: the client socket (through the proxy) and
the server side's accepted socket, so it can check each direction on its own. "Nothing arrives"
is checked with a short read timeout (the partition's whole point is that reads hang); everything
expected to arrive gets a long one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from tcpproxy import MAX_BUFFER, TcpProxy, TcpProxyError  # noqa: E402

#: For bytes that must arrive (generous: the machine is shared).
ARRIVE = 30.0
#: For bytes that must not arrive while partitioned.
SILENCE = 1.0


class Target:
    """A listening socket on 127.0.0.1 whose connections the test accepts and drives itself."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept(self, timeout: float = ARRIVE) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(ARRIVE)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.fixture
def proxy(target: Target) -> Iterator[TcpProxy]:
    with TcpProxy(target.port) as p:
        yield p


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=ARRIVE)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise AssertionError(f"connection closed after {len(out)} of {size} bytes")
        out += chunk
    return bytes(out)


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives and the connection is not closed: the read times out."""
    sock.settimeout(SILENCE)
    try:
        with pytest.raises(TimeoutError):
            data = sock.recv(1)
            raise AssertionError(f"expected silence, got {data!r} (b'' means the connection was closed)")
    finally:
        sock.settimeout(ARRIVE)


# ---- plain forwarding ------------------------------------------------------------------------------


def test_echo_through_proxy_and_counters(target: Target) -> None:
    proxy = TcpProxy(target.port).start()
    try:
        client = connect(proxy)
        server = target.accept()
        for message in (b"hello", b"world!" * 1000):
            client.sendall(message)
            got = recv_exactly(server, len(message))
            server.sendall(got.upper())
            assert recv_exactly(client, len(message)) == message.upper()
        client.close()
    finally:
        proxy.stop()
    # Read after stop(): the thread has been joined, so every counter update happened.
    assert proxy.connections == 1
    assert proxy.bytes_up == 5 + 6000
    assert proxy.bytes_down == 5 + 6000


def test_many_connections_are_independent(proxy: TcpProxy, target: Target) -> None:
    pairs = []
    for i in range(5):
        client = connect(proxy)
        pairs.append((client, target.accept()))
    for i, (client, server) in enumerate(pairs):
        client.sendall(f"conn {i}".encode())
    for i, (client, server) in enumerate(reversed(pairs)):
        n = len(pairs) - 1 - i
        assert recv_exactly(server, len(f"conn {n}")) == f"conn {n}".encode()
    for client, _ in pairs:
        client.close()
    assert proxy.connections == 5


def test_half_close_is_passed_on_in_order(proxy: TcpProxy, target: Target) -> None:
    client = connect(proxy)
    server = target.accept()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(server, 7) == b"request"
    assert server.recv(1) == b""  # the FIN, after the data
    server.sendall(b"reply")
    server.close()
    assert recv_exactly(client, 5) == b"reply"
    assert client.recv(1) == b""
    client.close()


def test_refused_target_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with TcpProxy(dead_port) as proxy:
            client = connect(proxy)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
            client.close()


# ---- partition and heal ----------------------------------------------------------------------------


def test_partition_blackholes_both_directions_and_heal_resumes_the_same_connection(
    proxy: TcpProxy, target: Target
) -> None:
    client = connect(proxy)
    server = target.accept()
    client.sendall(b"before")
    assert recv_exactly(server, 6) == b"before"

    proxy.partition()
    assert proxy.partitioned
    client.sendall(b"up during partition")
    server.sendall(b"down during partition")
    assert_silent(server)  # neither direction moves, and neither end sees a close
    assert_silent(client)
    assert proxy.open_connections == 1

    proxy.heal()
    assert not proxy.partitioned
    # Same sockets: what was sent during the partition arrives now, in order, then traffic goes on.
    assert recv_exactly(server, 19) == b"up during partition"
    assert recv_exactly(client, 21) == b"down during partition"
    client.sendall(b"after")
    assert recv_exactly(server, 5) == b"after"
    assert proxy.connections == 1
    client.close()


def test_partition_applies_back_pressure_and_heal_delivers_everything(proxy: TcpProxy, target: Target) -> None:
    # A small, fixed send buffer (Linux otherwise grows it to tcp_wmem's 4 MiB) and far more data
    # than it, the proxy's buffers and the proxy's untouched receive buffer hold: the sender must block.
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.settimeout(ARRIVE)
    client.connect(("127.0.0.1", proxy.port))
    server = target.accept()
    proxy.partition()
    payload = os.urandom(64 * MAX_BUFFER + 12345)
    sent = threading.Event()

    def send() -> None:
        client.sendall(payload)
        sent.set()

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send)
        assert not sent.wait(SILENCE), "sendall finished during a partition: bytes went somewhere"
        assert_silent(server)
        proxy.heal()
        received = recv_exactly(server, len(payload))
        sending.result(ARRIVE)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    client.close()


def test_new_connection_during_partition_is_accepted_held_then_connected_on_heal(
    proxy: TcpProxy, target: Target
) -> None:
    proxy.partition()
    client = connect(proxy)  # the TCP handshake with the proxy completes...
    client.sendall(b"hello?")
    with pytest.raises(TimeoutError):
        target.accept(timeout=SILENCE)  # ...but nothing reaches the target
    assert_silent(client)
    assert proxy.connections == 1

    proxy.heal()
    server = target.accept()
    assert recv_exactly(server, 6) == b"hello?"
    server.sendall(b"hello!")
    assert recv_exactly(client, 6) == b"hello!"
    client.close()


def test_close_during_partition_is_noticed_after_heal(proxy: TcpProxy, target: Target) -> None:
    client = connect(proxy)
    server = target.accept()
    proxy.partition()
    client.sendall(b"last words")
    client.close()
    assert_silent(server)  # the close does not get through either
    proxy.heal()
    assert recv_exactly(server, 10) == b"last words"
    assert server.recv(1) == b""


def test_repeated_partitions(proxy: TcpProxy, target: Target) -> None:
    client = connect(proxy)
    server = target.accept()
    for round_ in range(3):
        proxy.partition()
        proxy.partition()  # idempotent
        client.sendall(f"r{round_}".encode())
        if round_ == 0:
            assert_silent(server)
        proxy.heal()
        proxy.heal()
        assert recv_exactly(server, 2) == f"r{round_}".encode()
    client.close()


# ---- stop ------------------------------------------------------------------------------------------


def test_stop_closes_open_held_and_pending_connections(target: Target) -> None:
    proxy = TcpProxy(target.port).start()
    port = proxy.port
    flowing = connect(proxy)
    flowing_server = target.accept()
    flowing.sendall(b"x")
    assert recv_exactly(flowing_server, 1) == b"x"
    proxy.partition()
    pending = connect(proxy)  # accepted during the partition, never connected upstream
    pending.sendall(b"y")

    proxy.stop()
    proxy.stop()  # idempotent

    for sock in (flowing, pending, flowing_server):
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # closed with unread data: the kernel resets instead of FIN; closed either way
        sock.close()
    assert proxy.open_connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=ARRIVE).close()
    with pytest.raises(TcpProxyError):
        proxy.heal()
    with pytest.raises(TcpProxyError):
        proxy.start()


def test_commands_need_a_running_proxy(target: Target) -> None:
    proxy = TcpProxy(target.port)
    with pytest.raises(TcpProxyError):
        proxy.partition()
    proxy.stop()  # stopping a proxy that never started is harmless


def test_listen_port_is_honoured(target: Target) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    with TcpProxy(target.port, listen_port=wanted) as proxy:
        assert proxy.port == wanted
        client = connect(proxy)
        target.accept()
        client.close()


# ---- TLS through the proxy -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as between agent and gateway
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    ca.issue_cert("agent.test").configure_cert(client_ctx)
    return server_ctx, client_ctx


def test_mutual_tls_handshake_and_data_through_the_proxy_survive_a_partition(
    proxy: TcpProxy, target: Target, ca: trustme.CA
) -> None:
    server_ctx, client_ctx = _tls_contexts(ca)

    def serve() -> tuple[ssl.SSLSocket, str]:
        raw = target.accept()
        tls = server_ctx.wrap_socket(raw, server_side=True)
        peer = tls.getpeercert()
        subject_alt = dict(peer["subjectAltName"]) if peer else {}
        return tls, subject_alt.get("DNS", "")

    with ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(serve)
        client = client_ctx.wrap_socket(connect(proxy), server_hostname="127.0.0.1")
        server, peer_name = accepting.result(ARRIVE)
    assert peer_name == "agent.test"  # the server saw the client's certificate through the proxy
    assert client.version() in ("TLSv1.2", "TLSv1.3")

    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert recv_exactly(server, 18) == b"GET / HTTP/1.1\r\n\r\n"

    proxy.partition()
    server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert_silent(client)
    proxy.heal()
    assert recv_exactly(client, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    client.close()
    server.close()


def test_tls_handshake_started_during_partition_completes_after_heal(
    proxy: TcpProxy, target: Target, ca: trustme.CA
) -> None:
    server_ctx, client_ctx = _tls_contexts(ca)
    proxy.partition()
    raw = connect(proxy)
    with ThreadPoolExecutor(1) as pool:
        handshaking = pool.submit(lambda: client_ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        with pytest.raises(TimeoutError):
            target.accept(timeout=SILENCE)
        assert not handshaking.done()  # the client hangs in its handshake, as behind a dead route
        proxy.heal()
        server = server_ctx.wrap_socket(target.accept(), server_side=True)
        client = handshaking.result(ARRIVE)
    client.sendall(b"ok")
    assert recv_exactly(server, 2) == b"ok"
    client.close()
    server.close()


# ---- the command line --------------------------------------------------------------------------


def test_command_line_partitions_on_signals(target: Target) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "tcpproxy.py"), str(target.port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port), timeout=ARRIVE)
        server = target.accept()
        proc.send_signal(signal.SIGUSR1)
        assert "partitioned" in proc.stderr.readline()  # printed once the partition is in force
        client.sendall(b"held")
        assert_silent(server)
        proc.send_signal(signal.SIGUSR2)
        assert "forwarding" in proc.stderr.readline()
        assert recv_exactly(server, 4) == b"held"
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(ARRIVE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
