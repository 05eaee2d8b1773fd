"""``serve(host, port, settings)``: run the gateway under uvicorn with our TLS.

* The server certificate is issued by our own CA for ``host``, ``127.0.0.1`` and ``localhost`` and
  kept in ``<ca_dir>/gateway/`` (key 0600). It is re-issued at start and by a daily check when it
  nears expiry, no longer matches the CA, its chain or the host names; a re-issued certificate is
  loaded into the live ``SSLContext``, so new connections get it without a restart.
* During a CA rotation the server certificate is issued by the previous CA and sent with that CA's
  certificate cross-signed by the new one: agents that still trust only the previous CA verify it
  directly, agents registering with a token pinned to the new CA through the cross certificate
  (see :mod:`executor_plugin.pki`). After ``ca retire-old`` it is issued by the current CA.
* Client certificates are ``CERT_OPTIONAL`` at the TLS layer (trust-bundle and register must work
  without one) and verified against our CA bundle; every other route requires one
  (:mod:`executor_plugin.gateway.auth`). A CA added by ``ca rotate`` is added to the live context
  within seconds; one removed by ``ca retire-old`` leaves the TLS layer only at the next start
  (``auth`` refuses its certificates meanwhile).
* SIGTERM/SIGINT: held long-polls are answered at once ("no lease"), in-flight requests finish,
  the process returns normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from edge_agent.identity.pki_utils import load_cert, pubkey_fingerprint
from executor_plugin.gateway.app import create_app
from executor_plugin.gateway.ca_watch import CASnapshot
from executor_plugin.gateway.tls import default_protocol
from executor_plugin.pki import CertificateAuthority, ensure_private_dir, write_file_atomic
from executor_plugin.settings import HostedSettings

log = logging.getLogger(__name__)

SERVER_CERT_TTL = timedelta(days=90)
#: Re-issue the server certificate when less than this is left.
RENEW_BEFORE = timedelta(days=30)
CERT_CHECK_INTERVAL = 24 * 3600.0
#: Connections stay open between an agent's calls (a fresh mTLS handshake costs far more).
KEEP_ALIVE_SECONDS = 75
#: Backstop for shutdown: requests still running this long after SIGTERM are cancelled.
GRACEFUL_SHUTDOWN_SECONDS = 15
_WILDCARDS = {"", "0.0.0.0", "::"}


def gateway_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """Names the server certificate must cover: the bind host (or this machine's name when bound
    to all interfaces), any public names agents use, and loopback."""
    first = socket.getfqdn() if host in _WILDCARDS else host
    return list(dict.fromkeys([first, *extra, "127.0.0.1", "localhost"]))


class ServerCertificate:
    """The gateway's certificate and key in ``<ca_dir>/gateway/``."""

    def __init__(self, ca: CertificateAuthority, hosts: list[str]) -> None:
        self.ca = ca
        self.hosts = hosts
        self.dir = ca.ca_dir / "gateway"
        self.cert_path = self.dir / "server.pem"
        self.key_path = self.dir / "server.key"

    def problem(self, now: datetime | None = None) -> str | None:
        """Why the stored certificate cannot be used as it is, or None when it can."""
        now = now or datetime.now(timezone.utc)
        try:
            cert, *chain = x509.load_pem_x509_certificates(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return "missing or unreadable"
        if pubkey_fingerprint(cert.public_key()) != pubkey_fingerprint(key.public_key()):
            return "certificate and key do not match"
        issuer = self.ca.server_issuer()
        try:
            cert.verify_directly_issued_by(issuer.cert)
        except (ValueError, TypeError, InvalidSignature):
            return "not issued by the current CA" if issuer is self.ca else "not issued by the previous CA (rotation)"
        if cert.not_valid_after_utc - now < RENEW_BEFORE:
            return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return "no subject alternative names"
        covered = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
        missing = [host for host in self.hosts if host not in covered]
        if missing:
            return f"does not cover {', '.join(missing)}"
        if [load_cert(pem) for pem in self.ca.server_chain_pems()] != chain:
            return "its chain does not match the CA rotation state"
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two gateways sharing a CA directory (active/active on one host) start at the same moment:
        # without the lock one can overwrite the key between the other's write and load, and that
        # gateway fails to start with "key values mismatch".
        ensure_private_dir(self.dir)
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ensure(self) -> bool:
        """Issue a new certificate if needed; True when one was issued."""
        with self._locked():
            reason = self.problem()
            if reason is None:
                return False
            cert_pem, key_pem = self.ca.server_issuer().issue_server_cert(self.hosts, SERVER_CERT_TTL)
            chain = "".join(self.ca.server_chain_pems())
            # Key first: a crash in between leaves a mismatch that the next check repairs.
            write_file_atomic(self.key_path, key_pem.encode(), 0o600)
            write_file_atomic(self.cert_path, (cert_pem + chain).encode(), 0o644)
        log.info("issued gateway server certificate for %s (previous one: %s)", ", ".join(self.hosts), reason)
        return True

    def load_into(self, ctx: ssl.SSLContext) -> None:
        with self._locked():
            ctx.load_cert_chain(str(self.cert_path), str(self.key_path))


def build_ssl_context(ca: CertificateAuthority, server_cert: ServerCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_cert.load_into(ctx)
    # Optional at the TLS layer: trust-bundle and register are called before an agent has a cert.
    # A presented certificate must still chain to our CA, or the handshake fails.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata="\n".join(ca.bundle_pems()))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class GatewayServer(uvicorn.Server):
    """uvicorn's server plus: the one-line start message, long-polls released first on shutdown,
    and the daily server-certificate check."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_shutdown: Callable[[], Awaitable[None]],
        refresh_cert: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown
        self._refresh_cert = refresh_cert
        self._refresher: asyncio.Task[None] | None = None
        self.bound_port: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        self.bound_port = self.servers[0].sockets[0].getsockname()[1]
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        log.info("gateway listening on https://%s:%d", shown, self.bound_port)
        if self._refresh_cert is not None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_daily())

    async def _refresh_daily(self) -> None:
        assert self._refresh_cert is not None
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL)
            try:
                await asyncio.to_thread(self._refresh_cert)
            except Exception:
                log.exception("gateway server certificate check failed; will retry in a day")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for running requests; a held long-poll would keep it waiting up to 50 s.
        await self._on_shutdown()
        if self._refresher is not None:
            self._refresher.cancel()
        await super().shutdown(sockets)


@contextlib.contextmanager
def _absorb_stop_signals() -> Iterator[None]:
    # uvicorn re-raises the signal it handled once it has stopped; without a quiet handler here the
    # process would die of that SIGTERM (or raise KeyboardInterrupt) after a clean shutdown.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_server(
    host: str, port: int, settings: HostedSettings, *, hostnames: Sequence[str] = (), **uvicorn_options: Any
) -> GatewayServer:
    """Build (not start) the gateway server; ``serve`` runs it, tests may run it in a thread.

    ``hostnames``: extra DNS names or addresses agents reach the gateway by (for the certificate).
    """
    ca = CertificateAuthority.load(settings.ca_dir)
    server_cert = ServerCertificate(ca, gateway_hosts(host, (*settings.gateway_hostnames, *hostnames)))
    server_cert.ensure()
    ctx = build_ssl_context(ca, server_cert)
    app = create_app(settings, ca=ca)

    def refresh_cert() -> None:
        server_cert.ensure()
        # Loaded even when this process did not re-issue it: another gateway sharing the CA
        # directory may have. New handshakes use it.
        server_cert.load_into(ctx)

    async def on_ca_change(snapshot: CASnapshot) -> None:
        # Adds the new CA for client certificates (an SSLContext cannot forget one: a retired CA
        # is refused by auth until the next start).
        ctx.load_verify_locations(cadata="\n".join(snapshot.bundle_pems))
        server_cert.ca = snapshot.ca
        try:
            await asyncio.to_thread(refresh_cert)
        except (OSError, ssl.SSLError, ValueError):
            # E.g. another gateway was between writing the key and the certificate: the daily
            # check, or the next CA change, loads it.
            log.exception("could not load the re-issued gateway server certificate")

    app.state.gateway.live_ca.listeners.append(on_ca_change)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_context_factory=lambda _config, _default: ctx,
        http=default_protocol(),
        interface="asgi3",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        **uvicorn_options,
    )
    return GatewayServer(config, on_shutdown=app.state.gateway.notifier.aclose, refresh_cert=refresh_cert)


def serve(host: str, port: int, settings: HostedSettings, *, hostnames: Sequence[str] = ()) -> None:
    """Run the gateway until SIGTERM or SIGINT. ``port=0`` picks a free port (see the log line)."""
    server = make_server(host, port, settings, hostnames=hostnames)
    with _absorb_stop_signals():
        server.run()
    log.info("gateway stopped")


__all__ = ["GatewayServer", "ServerCertificate", "build_ssl_context", "gateway_hosts", "make_server", "serve"]
