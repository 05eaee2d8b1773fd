"""uvicorn protocol subclasses that show the TLS peer certificate to the ASGI app.

uvicorn 0.54 verifies client certificates but does not pass them on (the ASGI TLS extension is
still unmerged upstream, PRs #3132/#3133). These subclasses read the verified leaf once, when the
connection is made (asyncio calls ``connection_made`` after the handshake), and put::

    scope["extensions"]["tls"] = {"client_cert_der": bytes | None, "tls_version": str | None}

into every request's scope on that connection. The same dict object is shared by all requests of
one connection, so :mod:`executor_plugin.gateway.auth` caches its parsing result in it.

This relies on uvicorn internals (``self.app`` per protocol instance); ``uvicorn`` is pinned in
``pyproject.toml`` and ``tests/integration/test_gateway_tls.py`` pins the behaviour. Drop the shim
once uvicorn ships the TLS extension.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

TLS_EXTENSION = "tls"


def _peer_tls(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    # Leaf only (Python < 3.13 has no get_verified_chain); it was verified against our CA bundle
    # during the handshake, so its contents can be trusted as issued by us.
    return {"client_cert_der": ssl_object.getpeercert(binary_form=True), "tls_version": ssl_object.version()}


def _attach(protocol: Any, transport: asyncio.BaseTransport) -> None:
    tls = _peer_tls(transport)
    if tls is None:
        return
    inner = protocol.app

    async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = dict(scope)
        scope["extensions"] = {**(scope.get("extensions") or {}), TLS_EXTENSION: tls}
        await inner(scope, receive, send)

    protocol.app = app_with_tls


class TLSH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _attach(self, transport)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
    TLSHttpToolsProtocol = None
else:

    class TLSHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[no-redef]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            _attach(self, transport)


def default_protocol() -> type[asyncio.Protocol]:
    """The faster httptools protocol when installed, else h11 (same choice as uvicorn's 'auto')."""
    return TLSHttpToolsProtocol or TLSH11Protocol


__all__ = ["TLSH11Protocol", "TLSHttpToolsProtocol", "TLS_EXTENSION", "default_protocol"]
