"""The certificate rotation loop: a new key and certificate at a jittered 70-90 % of the certificate's lifetime.

When the time comes it generates a new P-256 key, sends a CSR to ``RENEW_PATH`` under the current
certificate, checks the reply (same agent, our new key), stores key and certificate with
:meth:`Keystore.save_rotated` (crash-safe) and swaps the API's HTTP client
(:meth:`AgentAPI.replace_client`). Requests in flight, a lease long-poll or a task's Execution API
call relayed by the forwarder, finish on the old connection; the forwarder's ``send`` is bound to
the ``AgentAPI``, not to a client, so it keeps working. Running tasks never hold the key, so they do
not notice.

A failed renewal is retried with backoff until the certificate expires (the heartbeat then stops
the agent with "certificate expired: re-register"). A rejected identity (revoked) stops the agent.

*Lifetime.* The gateway backdates ``notBefore`` by :data:`ISSUER_BACKDATE` for clock skew. With a
short TTL (tests use a minute) that backdating is most of the nominal lifetime, and 70 % of
``notAfter - notBefore`` would come *before* the certificate was even issued: the agent would renew
in a tight loop. So the lifetime is counted from ``notBefore + ISSUER_BACKDATE``, the issue time.
For an issuer that does not backdate this only moves the renewal later by that much, still before
``notAfter``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable

from edge_agent.backoff import Backoff
from edge_agent.errors import CertificateExpired, EdgeAgentError, IdentityError, IdentityRejected
from edge_agent.protocol import RenewRequest

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.identity.keystore import Keystore, StoredIdentity

log = logging.getLogger(__name__)

#: How far the gateway backdates ``notBefore`` (``executor_plugin.pki.BACKDATE``; a unit test pins it).
ISSUER_BACKDATE = timedelta(minutes=5)
FIRST, LAST = 0.7, 0.9
#: Shortest pause between two failed attempts: a gateway that fails fast must not be hammered.
MIN_RETRY_SECONDS = 1.0


def lifetime(cert_pem: str) -> tuple[datetime, datetime]:
    """(issued, notAfter) of a certificate, with the issuer's backdating taken off (module doc)."""
    # Read with the standard library: this runs at every start, and `cryptography` would add ~8 MB
    # to the idle control process.
    from edge_agent.identity.certinfo import validity

    not_before, not_after = validity(cert_pem)
    issued = not_before + ISSUER_BACKDATE if not_after - not_before > ISSUER_BACKDATE else not_before
    return issued, not_after


def renewal_time(cert_pem: str, fraction: float) -> datetime:
    """When to renew: ``fraction`` (drawn from U(0.7, 0.9)) of the way from issue to expiry."""
    issued, not_after = lifetime(cert_pem)
    return issued + (not_after - issued) * fraction


def renew(api: Any, identity: "StoredIdentity") -> "StoredIdentity":
    """One renewal: new key, CSR under the current certificate, reply checked. Stores nothing."""
    from cryptography.hazmat.primitives import serialization

    from edge_agent.identity import pki_utils

    key = pki_utils.generate_key()
    reply = api.renew(RenewRequest(csr_pem=pki_utils.make_csr(key, identity.name)))
    if reply.agent_id != identity.agent_id:
        raise IdentityError(f"the gateway renewed the certificate of agent {reply.agent_id!r}, not of "
                            f"{identity.agent_id!r}; keeping the current one")
    try:
        cert = pki_utils.load_cert(reply.cert_pem)
    except ValueError as exc:
        raise IdentityError(
            f"the gateway's renewed certificate cannot be read ({exc}); keeping the current one") from None
    if pki_utils.pubkey_fingerprint(cert.public_key()) != pki_utils.pubkey_fingerprint(key.public_key()):
        raise IdentityError("the gateway returned a certificate for another key; keeping the current one")
    return dataclasses.replace(
        identity,
        name=reply.name,
        queues=tuple(reply.queues),
        region=reply.region,
        executor=reply.executor,
        cert_pem=reply.cert_pem,
        cert_not_after=pki_utils.cert_not_after(reply.cert_pem),
        # Came over our verified mTLS channel; during a CA rotation it holds the old and the new CA.
        ca_pems=tuple(reply.ca_pems) or identity.ca_pems,
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


class RotationLoop:
    def __init__(
        self,
        agent: "Agent",
        keystore: "Keystore",
        client_factory: Callable[["StoredIdentity"], Any],
        *,
        fraction: Callable[[], float] = lambda: random.uniform(FIRST, LAST),
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.agent = agent
        self.keystore = keystore
        self.client_factory = client_factory
        self.fraction = fraction
        self.now = now
        self.backoff = Backoff(base=5.0, cap=300.0)
        self.rotations = 0

    def run(self) -> None:
        a = self.agent
        due = self._schedule()
        while True:
            wait = max(0.0, (due - self.now()).total_seconds())
            with a.cond:
                if a.cond.wait_for(lambda: a.loops_stopping, timeout=wait):
                    break
            if a.identity.expired(self.now()):
                a.fail(CertificateExpired(a.identity.cert_not_after))
                break
            try:
                self.rotate()
            except IdentityRejected as exc:
                a.fail(exc)
                break
            except EdgeAgentError as exc:
                due = self._retry_at(exc)
                continue
            self.backoff.reset()
            due = self._schedule()
        a.status.activity("rotation", "stopped")

    def rotate(self) -> None:
        """Renew, store, swap: new requests use the new certificate from here on."""
        a = self.agent
        a.status.activity("rotation", "renewing the certificate")
        new = renew(a.api, a.identity)
        self.keystore.save_rotated(new)  # before the swap: a crash now restarts with the new pair
        a.api.replace_client(self.client_factory(new))
        with a.cond:
            a.identity = new
            a.cond.notify_all()
        self.rotations += 1
        log.info("certificate renewed with a new key; it expires %s", new.cert_not_after.isoformat())

    def _schedule(self) -> datetime:
        a = self.agent
        due = renewal_time(a.identity.cert_pem, self.fraction())
        a.status.activity("rotation", f"certificate expires {a.identity.cert_not_after.isoformat(timespec='seconds')};"
                                      f" renewal at {due.isoformat(timespec='seconds')}")
        return due

    def _retry_at(self, exc: EdgeAgentError) -> datetime:
        a = self.agent
        left = (a.identity.cert_not_after - self.now()).total_seconds()
        # Never sleep past expiry: leave room for a few more attempts in what is left.
        delay = max(MIN_RETRY_SECONDS, min(self.backoff.next(), left / 4))
        (log.warning if self.backoff.attempt == 1 else log.debug)(
            "certificate renewal failed (%s); retrying in %.0fs (certificate expires in %.0fs)", exc, delay, left)
        a.status.activity("rotation", f"renewal failed, retrying in {delay:.0f}s: {exc}")
        return self.now() + timedelta(seconds=delay)


__all__ = ["FIRST", "ISSUER_BACKDATE", "LAST", "RotationLoop", "lifetime", "renew", "renewal_time"]
