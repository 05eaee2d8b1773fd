"""Pins the uvicorn behaviour the peer-certificate shim (``executor_plugin.gateway.tls``) relies on.

A real uvicorn server (in a thread, on a socket bound to 127.0.0.1) with a tiny ASGI app that
echoes what it finds in ``scope["extensions"]["tls"]``; real TLS from a trustme CA.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest
import trustme
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from uvicorn.protocols.http.h11_impl import H11Protocol

from executor_plugin.gateway.tls import TLSH11Protocol, TLSHttpToolsProtocol, default_protocol


#: Every TLS dict seen, kept alive so identity comparisons stay meaningful (id() values get reused).
_SEEN: list[dict] = []


def _connection_number(tls: dict) -> int:
    for number, seen in enumerate(_SEEN):
        if seen is tls:
            return number
    _SEEN.append(tls)
    return len(_SEEN) - 1


async def echo_tls(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    tls = (scope.get("extensions") or {}).get("tls")
    body = {
        "has_tls": tls is not None,
        "der": tls["client_cert_der"].hex() if tls and tls["client_cert_der"] else None,
        "version": tls["tls_version"] if tls else None,
        "connection": _connection_number(tls) if tls else None,
    }
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    return ca, ca.issue_cert("127.0.0.1"), ca.issue_cert("agent.example.test")


def _server_ctx(pki) -> ssl.SSLContext:
    ca, server_leaf, _ = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_leaf.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@pytest.fixture
def serve_echo(pki) -> Iterator:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(protocol) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # connections wait in the backlog until uvicorn accepts: no readiness race
        ctx = _server_ctx(pki)
        config = uvicorn.Config(
            echo_tls, ssl_context_factory=lambda _c, _d: ctx, http=protocol, interface="asgi3", log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"https://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def _client(pki, *, with_cert: bool) -> httpx.Client:
    ca, _, client_leaf = pki
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if with_cert:
        client_leaf.configure_cert(ctx)
    return httpx.Client(verify=ctx, timeout=30)


SHIMS = [TLSH11Protocol] + ([TLSHttpToolsProtocol] if TLSHttpToolsProtocol is not None else [])


@pytest.mark.parametrize("protocol", SHIMS, ids=lambda p: p.__name__)
def test_shim_exposes_the_verified_client_certificate_per_connection(serve_echo, pki, protocol):
    url = serve_echo(protocol)
    expected = x509.load_pem_x509_certificate(pki[2].cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    with _client(pki, with_cert=True) as c:
        first, second = c.get(url).json(), c.get(url).json()
    with _client(pki, with_cert=True) as c:
        other_connection = c.get(url).json()
    assert first["has_tls"] and bytes.fromhex(first["der"]) == expected
    assert first["version"] in ("TLSv1.2", "TLSv1.3")
    # One dict per connection: requests on a kept-alive connection share it (auth caches in it) ...
    assert first["connection"] == second["connection"]
    # ... and another connection gets its own.
    assert other_connection["connection"] != first["connection"]


@pytest.mark.parametrize("protocol", SHIMS, ids=lambda p: p.__name__)
def test_shim_without_client_certificate(serve_echo, pki, protocol):
    url = serve_echo(protocol)
    with _client(pki, with_cert=False) as c:
        body = c.get(url).json()
    assert body["has_tls"] is True and body["der"] is None


def test_plain_uvicorn_still_hides_the_peer_certificate(serve_echo, pki):
    # When this fails, uvicorn ships the ASGI TLS extension itself: drop the shim in gateway/tls.py.
    url = serve_echo(H11Protocol)
    with _client(pki, with_cert=True) as c:
        assert c.get(url).json()["has_tls"] is False


def test_default_protocol_is_a_shim():
    assert default_protocol() in SHIMS
