"""The CA as it is on disk now, for a gateway that runs for weeks.

``airflow edge-agents ca rotate`` and ``ca retire-old`` run in an admin's shell, and every gateway
replica must follow within seconds without a restart: new certificates are signed by the new CA,
the trust bundle served to agents changes, and client certificates of a retired CA are refused.
:class:`LiveCA` holds an immutable :class:`CASnapshot`; :meth:`LiveCA.refresh` (run in a thread
every :data:`CA_CHECK_SECONDS` by the app's lifespan) reloads it when the CA directory changed,
then runs the registered listeners (the server adds the new CA to its TLS context and re-issues its
own certificate).

What a running process cannot do is drop a CA from a live TLS context: after ``retire-old`` the
TLS layer still completes handshakes with old-CA certificates until the gateway restarts, and
:mod:`executor_plugin.gateway.auth` refuses them (401) at the application layer meanwhile.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from edge_agent.identity.pki_utils import spki_pin
from executor_plugin.pki import BUNDLE_DIR, CA_CERT_FILE, CROSS_DIR, CertificateAuthority

log = logging.getLogger(__name__)

#: How often a gateway looks for a rotated or retired CA (a few stat calls each time).
CA_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class CASnapshot:
    ca: CertificateAuthority
    bundle_pems: tuple[str, ...]
    bundle_certs: tuple[x509.Certificate, ...]
    bundle_pins: frozenset[bytes]


def _snapshot(ca: CertificateAuthority) -> CASnapshot:
    pems = tuple(ca.bundle_pems())
    return CASnapshot(
        ca=ca,
        bundle_pems=pems,
        bundle_certs=tuple(x509.load_pem_x509_certificate(pem.encode()) for pem in pems),
        bundle_pins=frozenset(spki_pin(pem) for pem in pems),
    )


def _stamp(ca_dir: Path) -> tuple:
    """Changes whenever the current CA or the bundle changes (every write is an atomic rename)."""

    def entry(path: Path) -> tuple:
        try:
            st = path.stat()
        except OSError:
            return (path.name, None)
        return (path.name, st.st_ino, st.st_mtime_ns, st.st_size)

    listing = []
    for sub in (BUNDLE_DIR, CROSS_DIR):
        try:
            names = sorted(os.listdir(ca_dir / sub))
        except OSError:
            names = []
        listing.append(tuple(entry(ca_dir / sub / name) for name in names))
    return (entry(ca_dir / CA_CERT_FILE), *listing)


Listener = Callable[[CASnapshot], Awaitable[None]]


class LiveCA:
    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca_dir = ca.ca_dir
        self._stamp = _stamp(self.ca_dir)
        self.snapshot = _snapshot(ca)
        self.listeners: list[Listener] = []

    @property
    def ca(self) -> CertificateAuthority:
        return self.snapshot.ca

    def refresh(self) -> bool:
        """Reload when the directory changed; True when the snapshot was replaced. Blocking."""
        stamp = _stamp(self.ca_dir)
        if stamp == self._stamp:
            return False
        snapshot = _snapshot(CertificateAuthority.load(self.ca_dir))
        # One assignment: a request reading `snapshot` sees the old CA or the new one, never a mix.
        self.snapshot, self._stamp = snapshot, stamp
        log.info(
            "edge-agent CA changed: current sha256:%s; trusted: %s",
            snapshot.ca.pin.hex(),
            ", ".join(f"sha256:{pin.hex()[:16]}…" for pin in sorted(snapshot.bundle_pins)),
        )
        return True

    async def notify(self) -> None:
        for listener in list(self.listeners):
            try:
                await listener(self.snapshot)
            except Exception:
                log.exception("a CA change listener failed")


__all__ = ["CA_CHECK_SECONDS", "CASnapshot", "LiveCA"]
