"""Certificate rotation: when it happens, and that it swaps credentials under real mTLS without
disturbing a request in flight through the task forwarder.

The gateway is faked (``fake_tls_gateway``) but the TLS is real, with the hosted side's own CA code
issuing short-lived certificates; the agent object, its rotation loop, the keystore, the AgentAPI
client and the Unix-socket forwarder are the real ones.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from cryptography import x509
from fake_tls_gateway import WAIT, FakeTLSGateway

from edge_agent import rotation
from edge_agent.agent import Agent
from edge_agent.backoff import Backoff
from edge_agent.client import AgentAPI
from edge_agent.config import AgentConfig
from edge_agent.errors import CertificateExpired, IdentityRejected
from edge_agent.forwarder import Forwarder
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.rotation import RotationLoop, lifetime, renewal_time
from edge_agent.transport import build_client


def test_backdate_matches_the_hosted_issuer() -> None:
    from executor_plugin import pki

    assert rotation.ISSUER_BACKDATE == pki.BACKDATE


def test_renewal_is_counted_from_issue_not_from_the_backdated_not_before(tmp_path: Path) -> None:
    gw = FakeTLSGateway(tmp_path, ttl=timedelta(seconds=60))
    try:
        before = datetime.now(timezone.utc)
        identity, _ = gw.enroll()
        after = datetime.now(timezone.utc)
    finally:
        gw.stop()
    cert = x509.load_pem_x509_certificate(identity.cert_pem.encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=5, seconds=60)
    issued, not_after = lifetime(identity.cert_pem)
    assert before - timedelta(seconds=1) <= issued <= after
    # 70-90 % of the 60 s the certificate really lives, not of the 6 minutes it nominally spans
    # (70 % of those would be 'before it was issued': a renewal loop with no pause).
    assert issued + timedelta(seconds=42) == renewal_time(identity.cert_pem, 0.7)
    assert issued + timedelta(seconds=54) == renewal_time(identity.cert_pem, 0.9)


def test_a_certificate_without_backdating(tmp_path: Path) -> None:
    import trustme

    leaf = trustme.CA().issue_cert("a.test", not_after=datetime.now(timezone.utc) + timedelta(seconds=120))
    pem = leaf.cert_chain_pems[0].bytes().decode()
    issued, not_after = lifetime(pem)
    cert = x509.load_pem_x509_certificate(pem.encode())
    if not_after - cert.not_valid_before_utc > rotation.ISSUER_BACKDATE:
        assert issued == cert.not_valid_before_utc + rotation.ISSUER_BACKDATE
    assert issued < renewal_time(pem, 0.9) < not_after  # always before expiry


# -- the loop under real mTLS -----------------------------------------------------------------------


class Setup:
    def __init__(self, tmp_path: Path, ttl: timedelta) -> None:
        self.gw = FakeTLSGateway(tmp_path / "gw", ttl=ttl)
        self.identity, self.serial = self.gw.enroll()
        self.state = tmp_path / "state"
        self.keystore = Keystore(self.state, "file")
        self.keystore.save(self.identity)
        self.config = AgentConfig(state_dir=self.state, request_timeout=WAIT)
        self.agent = Agent(self.config, self.identity, lambda: None)
        self.agent.api = AgentAPI(build_client(self.identity.url, self.identity, WAIT))
        # The first renewal comes soon (10 % of the TTL), later ones late, so a test sees exactly one.
        fractions = iter([0.1] + [0.9] * 100)
        self.loop = RotationLoop(self.agent, self.keystore, lambda ident: build_client(ident.url, ident, WAIT),
                                 fraction=fractions.__next__)
        self.thread = threading.Thread(target=self.loop.run, name="rotation-under-test")
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ea-rot-"))
        self.forwarder = Forwarder(self.sock_dir / "fwd.sock", self.agent.api.execution_request)

    def wait_for_swap(self) -> StoredIdentity:
        with self.agent.cond:
            assert self.agent.cond.wait_for(lambda: self.agent.identity.cert_pem != self.identity.cert_pem,
                                            timeout=WAIT), "no rotation"
            return self.agent.identity

    def via_forwarder(self, path: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock_dir / "fwd.sock")),
                          base_url="http://forwarder", timeout=WAIT) as c:
            return c.get(path)

    def stop(self) -> None:
        with self.agent.cond:
            self.agent.loops_stopping = True
            self.agent.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(WAIT)
        self.forwarder.stop()
        self.agent.api.close()
        self.gw.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[Setup]:
    made: list[Setup] = []

    def make(ttl: timedelta = timedelta(seconds=60)) -> Setup:
        made.append(Setup(tmp_path, ttl))
        return made[-1]

    yield make  # type: ignore[misc]
    for s in made:
        s.stop()


def serial_of(identity: StoredIdentity) -> str:
    return format(x509.load_pem_x509_certificate(identity.cert_pem.encode()).serial_number, "x")


def test_rotation_swaps_credentials_without_disturbing_a_request_in_flight(setup) -> None:
    s: Setup = setup()
    s.forwarder.start()
    assert s.via_forwarder("/execution/who").json() == {"serial": s.serial}

    # A task's Execution API call is in flight on the old connection when the rotation happens.
    slow: dict[str, httpx.Response] = {}
    in_flight = threading.Thread(target=lambda: slow.setdefault("r", s.via_forwarder("/execution/slow")))
    in_flight.start()
    s.gw.wait_for(lambda: any(c.path == "/execution/slow" for c in s.gw.calls), "the slow call to arrive")

    s.thread.start()
    new = s.wait_for_swap()
    assert s.gw.renewals == 1
    renew_call = next(c for c in s.gw.calls if c.path == "/agents/v1/renew")
    assert renew_call.serial == s.serial  # asked for under the current certificate

    # New requests, through the same forwarder, go out with the new certificate and a new key.
    assert s.via_forwarder("/execution/who").json() == {"serial": serial_of(new)}
    assert new.key_pem != s.identity.key_pem and new.agent_id == s.identity.agent_id
    assert new.cert_not_after > s.identity.cert_not_after
    # ... and the one in flight finishes on the old connection.
    s.gw.release.set()
    in_flight.join(WAIT)
    assert slow["r"].status_code == 200 and slow["r"].json() == {"serial": s.serial}
    assert s.agent.api._retired == {}  # the old client was closed once its last request ended

    # Stored on disk: a restart uses the new pair.
    assert Keystore(s.state).load() == new
    assert "renewal at" in s.agent.status.snapshot()["activity"]["rotation"]


def test_failed_renewals_are_retried_with_backoff(setup) -> None:
    s: Setup = setup()
    s.loop.backoff = Backoff(base=0.2, cap=0.5)
    with s.gw.cond:
        s.gw.renew_failures = 2
    s.thread.start()
    s.wait_for_swap()
    assert s.gw.renewals == 1
    assert sum(1 for c in s.gw.calls if c.path == "/agents/v1/renew") == 3
    assert s.agent.fatal is None


def test_a_revoked_agent_stops(setup) -> None:
    s: Setup = setup()
    s.gw.status_for["/agents/v1/renew"] = 403
    s.thread.start()
    s.thread.join(WAIT)
    assert isinstance(s.agent.fatal, IdentityRejected) and s.agent.fatal.revoked
    assert Keystore(s.state).load() == s.identity  # nothing replaced


def test_an_expired_certificate_is_not_renewed(setup) -> None:
    s: Setup = setup()
    expired = StoredIdentity(**{**s.identity.__dict__,
                                "cert_not_after": datetime.now(timezone.utc) - timedelta(seconds=1)})
    s.agent.identity = expired
    s.thread.start()
    s.thread.join(WAIT)
    assert isinstance(s.agent.fatal, CertificateExpired)
    assert "re-register with a new token" in str(s.agent.fatal)
    assert s.gw.renewals == 0
