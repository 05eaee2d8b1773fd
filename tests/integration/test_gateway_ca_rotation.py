"""CA rotation against a running gateway (files changed by another process, as ``airflow edge-agents
ca rotate`` / ``ca retire-old`` do): agents of the old CA keep working, new registrations and
renewals get certificates of the new CA, and after retire-old old-CA certificates are refused, at
the TLS handshake once the gateway restarts."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from edge_agent.identity.pki_utils import generate_key, load_cert, make_csr, spki_pin
from edge_agent.protocol import (
    REGISTER_PATH,
    RENEW_PATH,
    TRUST_BUNDLE_PATH,
    WHOAMI_PATH,
    AgentIdentity,
    RegistrationToken,
)
from executor_plugin import store
from executor_plugin.pki import CertificateAuthority, issuer_pin

WAIT = 60.0  # upper bound for "the gateway noticed" (it checks every 2 s); never a duration asserted


def client(gw, trusted: list[str], cert: tuple[Path, Path] | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cadata="\n".join(trusted))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(base_url=gw.url, verify=ctx, timeout=30)


def save(folder: Path, cert_pem: str, key) -> tuple[Path, Path]:
    folder.mkdir(mode=0o700)
    cert_file, key_file = folder / "agent.pem", folder / "agent.key"
    cert_file.write_text(cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"gateway did not {what}"
        time.sleep(0.5)


def bundle_pins(gw, trusted: list[str]) -> list[bytes]:
    with client(gw, trusted) as c:
        return [spki_pin(p) for p in c.get(TRUST_BUNDLE_PATH).json()["ca_pems"]]


def whoami(gw, trusted: list[str], cert: tuple[Path, Path]) -> httpx.Response:
    with client(gw, trusted, cert) as c:
        return c.get(WHOAMI_PATH)


def register_pinned(gw, ca_pem: str, queue: str, folder: Path) -> tuple[AgentIdentity, tuple[Path, Path]]:
    """Register as the agent does: trusting only the CA pinned in the token until registered."""
    token = RegistrationToken.mint(spki_pin(ca_pem))
    with gw.home.session() as s:
        from datetime import timedelta

        store.create_token(
            s, token_id=token.token_id, secret_hash=store.hash_secret(token.secret), queues=[queue],
            region="it-1", name=None, ttl=timedelta(hours=1), max_uses=1,
        )
        s.commit()
    key = generate_key()
    with client(gw, [ca_pem]) as c:
        r = c.post(REGISTER_PATH, json={"token": str(token), "csr_pem": make_csr(key, "x"), "version": "it"})
    assert r.status_code == 200, r.text
    identity = AgentIdentity.model_validate(r.json())
    return identity, save(folder, identity.cert_pem, key)


def test_rotate_then_retire(start_gateway, tmp_path):
    gw = start_gateway()
    ca_dir = gw.home.path / "ca"
    old = gw.ca
    queue = gw.new_queue()
    before, before_cert = register_pinned(gw, old.cert_pem, queue, tmp_path / "before")
    stays_old, stays_old_cert = register_pinned(gw, old.cert_pem, queue, tmp_path / "stays-old")

    new, _ = CertificateAuthority.rotate(ca_dir)
    until(lambda: bundle_pins(gw, [old.cert_pem]) == [new.pin, old.pin], "publish the new bundle")
    # The server certificate moves onto the rotation chain (previous CA + cross certificate).
    until(lambda: "BEGIN CERTIFICATE" in (ca_dir / "gateway" / "server.pem").read_text().split("END CERTIFICATE")[1],
          "re-issue its server certificate with the cross certificate")

    # An agent of the old CA, trusting only the old CA, keeps working.
    assert whoami(gw, [old.cert_pem], before_cert).status_code == 200
    # A new registration with a token pinned to the new CA gets a new-CA certificate.
    fresh, fresh_cert = register_pinned(gw, new.cert_pem, queue, tmp_path / "fresh")
    assert issuer_pin(load_cert(fresh.cert_pem), [new.cert, old.cert]) == new.pin
    assert [spki_pin(p) for p in fresh.ca_pems] == [new.pin, old.pin]
    assert whoami(gw, [new.cert_pem], fresh_cert).status_code == 200
    # Renewal moves an old agent onto the new CA.
    key = generate_key()
    with client(gw, [old.cert_pem], before_cert) as c:
        r = c.post(RENEW_PATH, json={"csr_pem": make_csr(key, "x")})
    assert r.status_code == 200, r.text
    renewed = AgentIdentity.model_validate(r.json())
    assert issuer_pin(load_cert(renewed.cert_pem), [new.cert, old.cert]) == new.pin
    renewed_cert = save(tmp_path / "renewed", renewed.cert_pem, key)
    assert whoami(gw, list(renewed.ca_pems), renewed_cert).status_code == 200
    with gw.home.session() as s:
        issuers = {a.id: a.cert_issuer for a in store.list_agents(s)}
    assert issuers[before.agent_id] == new.pin.hex() and issuers[stays_old.agent_id] == old.pin.hex()

    # Retire the old CA: the running gateway refuses old-CA certificates within seconds...
    assert new.retire_old() == [old.pin]
    until(lambda: whoami(gw, [old.cert_pem, new.cert_pem], stays_old_cert).status_code == 401,
          "refuse a certificate of the retired CA")
    assert "no longer trusts" in whoami(gw, [old.cert_pem, new.cert_pem], stays_old_cert).json()["detail"]
    assert whoami(gw, list(renewed.ca_pems), renewed_cert).status_code == 200

    # ...and after a restart they fail the TLS handshake itself.
    assert gw.stop() == 0
    # The fixture's own launcher (conftest modules are not importable by a stable name).
    restarted = start_gateway.__globals__["_launch"](gw.home)
    try:
        with pytest.raises(httpx.TransportError):
            whoami(restarted, [old.cert_pem, new.cert_pem], stays_old_cert)
        assert whoami(restarted, [new.cert_pem], renewed_cert).status_code == 200
        assert whoami(restarted, [new.cert_pem], fresh_cert).status_code == 200
        with pytest.raises(httpx.TransportError):
            # An agent that still trusts only the old CA cannot verify the gateway any more either.
            whoami(restarted, [old.cert_pem], renewed_cert)
    finally:
        assert restarted.stop() == 0
