"""Builds the agent's HTTPS clients: TLS context, client certificate, keep-alive, proxies. Knows no endpoints.

* The gateway is verified against our own CA bundle only (no certifi, no OS store): a public CA or a
  TLS-inspecting proxy cannot impersonate it.
* The client certificate and key are loaded into the ``SSLContext`` from an anonymous in-memory file
  (``memfd``) where the OS has one, so a key kept in the keyring never touches the filesystem
  (:mod:`edge_agent.identity.tlskeys`).
* One long-lived ``httpx.Client`` per process: a reused connection costs ~1 ms, a new mTLS handshake
  4-8 ms of CPU plus round trips.
* ``trust_env=True``: ``HTTPS_PROXY``/``NO_PROXY`` are honoured (mTLS passes through a CONNECT proxy).
"""

from __future__ import annotations

import ssl
import sys
from typing import TYPE_CHECKING, Sequence

from edge_agent import __version__
from edge_agent.errors import InvalidURL
from edge_agent.identity.tlskeys import load_cert_chain

if TYPE_CHECKING:
    from types import ModuleType

    import httpx

    from edge_agent.identity.keystore import StoredIdentity

#: Shorter than uvicorn's default ``timeout_keep_alive`` (5 s): reusing a connection the server is
#: closing at that very moment fails the request with a RemoteProtocolError.
KEEPALIVE_EXPIRY = 4.0
USER_AGENT = f"edge-agent/{__version__}"


def normalize_url(url: str) -> str:
    """Validate a gateway URL (https only) and return it without a trailing slash."""
    from urllib.parse import urlsplit

    text = (url or "").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"gateway URL {text!r} is not valid: {exc}") from None
    if parts.scheme.lower() == "http":
        raise InvalidURL(
            f"gateway URL must use https:// (got {text!r}); the agent only talks to its gateway over TLS"
        )
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise InvalidURL(f"gateway URL must look like https://host[:port] (got {text!r})")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidURL(f"gateway URL must not carry credentials, a query or a fragment (got {text!r})")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    return f"https://{netloc}{parts.path.rstrip('/')}"


def tls_context(
    ca_pems: Sequence[str] | None,
    *,
    cert_pem: str | None = None,
    key_pem: bytes | None = None,
) -> ssl.SSLContext:
    """A client context trusting only ``ca_pems``; ``ca_pems=None`` disables verification (pin check only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pems is None:
        # Used once, to fetch the trust bundle whose CA pin the caller then checks before any secret
        # is sent (kubeadm discovery). Nothing secret travels on this context.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if not ca_pems:
            raise ValueError("empty CA bundle")
        ctx.load_verify_locations(cadata="\n".join(ca_pems))
    if cert_pem is not None and key_pem is not None:
        load_cert_chain(ctx, cert_pem.encode("ascii"), key_pem)
    return ctx


def import_httpx() -> "ModuleType":
    """``import httpx`` without httpx's command-line client, which a long-running agent never uses.

    httpx's ``__init__`` imports ``httpx._main`` (click, rich, pygments) whenever those are installed,
    as they are next to typer: about 5 MB of RSS for the life of the control process. A ``None`` entry
    in ``sys.modules`` makes that import raise ImportError, which httpx answers with a stub ``main``.
    Should a future httpx not tolerate that, it is imported again the ordinary way.
    """
    if "httpx" in sys.modules:
        return sys.modules["httpx"]
    blocked = sys.modules.setdefault("httpx._main", None) is None
    try:
        import httpx
    except ImportError:
        if not blocked:
            raise
        del sys.modules["httpx._main"]
        import httpx
    return httpx


def _client(base_url: str, ctx: ssl.SSLContext, timeout: float) -> "httpx.Client":
    httpx = import_httpx()
    return httpx.Client(
        base_url=base_url,
        verify=ctx,
        trust_env=True,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=KEEPALIVE_EXPIRY),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
    )


def build_client(url: str, identity: "StoredIdentity", timeout: float = 30.0) -> "httpx.Client":
    """The long-lived mTLS client: our CA bundle only, our client certificate, keep-alive, env proxies."""
    ctx = tls_context(identity.ca_pems, cert_pem=identity.cert_pem, key_pem=identity.key_pem)
    return _client(normalize_url(url), ctx, timeout)


def build_bootstrap_client(url: str, ca_pems: Sequence[str] | None, timeout: float = 30.0) -> "httpx.Client":
    """A client without a client certificate, for the trust bundle (``ca_pems=None``) and registration."""
    return _client(normalize_url(url), tls_context(ca_pems), timeout)


__all__ = ["build_bootstrap_client", "build_client", "import_httpx", "normalize_url", "tls_context"]
