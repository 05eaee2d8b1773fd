"""CA rotation (``CertificateAuthority.rotate`` / ``retire_old``): what agents of either CA trust and
present during and after a rotation, proven with real TLS handshakes in memory, and the recovery
of an interrupted rotation."""

from __future__ import annotations

import os
import ssl
from datetime import timedelta

import pytest

from edge_agent.identity.pki_utils import generate_key, load_cert, make_csr, spki_pin
from executor_plugin.gateway.server import ServerCertificate, build_ssl_context
from executor_plugin.pki import (
    BUNDLE_DIR,
    CROSS_DIR,
    CertificateAuthority,
    PKIError,
    RotationInProgress,
    issuer_pin,
)

DOMAIN = "unit.edge-agent.test"


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A full TLS handshake in memory; raises ssl.SSLError from whichever side refuses."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client believes it is
            # done; one read on each side surfaces a refusal.
            for end in (server, client):
                try:
                    end.read(1)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    pass
                s_in.write(c_out.read())
                c_in.write(s_out.read())
            return
    raise AssertionError("handshake did not finish")


def agent_ctx(trusted_pems: list[str], ca: CertificateAuthority | None, tmp_path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="\n".join(trusted_pems))
    if ca is not None:
        key = generate_key()
        cert_pem, _, _ = ca.sign_agent_csr(make_csr(key, "x"), agent_id=f"ag_{name}", trust_domain=DOMAIN,
                                           ttl=timedelta(hours=1))
        from cryptography.hazmat.primitives import serialization

        (tmp_path / f"{name}.pem").write_text(cert_pem)
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )
        ctx.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
    return ctx


def server_ctx(ca: CertificateAuthority) -> ssl.SSLContext:
    server_cert = ServerCertificate(ca, ["127.0.0.1"])
    server_cert.ensure()
    ctx = build_ssl_context(ca, server_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED  # so a refused client certificate shows as an error here
    return ctx


def test_rotation_keeps_both_cas_trusted_and_the_gateway_verifiable_by_old_agents(tmp_path):
    old, _ = CertificateAuthority.init(tmp_path / "ca")
    old_agent = agent_ctx([old.cert_pem], old, tmp_path, "old")  # registered before the rotation

    new, old_pin = CertificateAuthority.rotate(tmp_path / "ca")
    assert old_pin == old.pin and new.pin != old.pin
    assert CertificateAuthority.load(tmp_path / "ca").pin == new.pin
    bundle = new.bundle_pems()
    assert [spki_pin(p) for p in bundle] == [new.pin, old.pin]  # current first
    assert new.server_issuer().pin == old.pin  # every agent trusts it, or reaches it through:
    [cross] = new.server_chain_pems()
    assert issuer_pin(load_cert(cross), [new.cert]) == new.pin and spki_pin(cross) == old.pin
    assert (tmp_path / "ca" / "previous" / f"{old.pin.hex()}.key").stat().st_mode & 0o777 == 0o600

    gateway = server_ctx(new)
    chain = (tmp_path / "ca" / "gateway" / "server.pem").read_text()
    assert issuer_pin(load_cert(chain), [old.cert]) == old.pin and cross in chain
    # An agent that trusts only the old CA, with an old-CA certificate, still gets through...
    handshake(gateway, old_agent)
    # ...and so does one registered now (new-CA certificate, new bundle).
    handshake(gateway, agent_ctx(bundle, new, tmp_path, "new"))
    # An agent registering with a token pinned to the new CA trusts only it: the cross certificate
    # takes it to the gateway's certificate.
    handshake(gateway, agent_ctx([new.cert_pem], new, tmp_path, "newonly"))
    # Control: the helper does see a client certificate the gateway refuses.
    stranger, _ = CertificateAuthority.init(tmp_path / "stranger")
    with pytest.raises(ssl.SSLError):
        handshake(gateway, agent_ctx(bundle, stranger, tmp_path, "stranger"))


def test_retire_old_drops_the_previous_ca(tmp_path):
    old, _ = CertificateAuthority.init(tmp_path / "ca")
    old_agent = agent_ctx([old.cert_pem], old, tmp_path, "old")
    new, _ = CertificateAuthority.rotate(tmp_path / "ca")
    with pytest.raises(RotationInProgress, match="retire-old"):
        CertificateAuthority.rotate(tmp_path / "ca")

    assert new.retire_old() == [old.pin]
    assert [spki_pin(p) for p in new.bundle_pems()] == [new.pin]
    assert new.server_chain_pems() == [] and new.server_issuer().pin == new.pin
    assert not list((tmp_path / "ca" / CROSS_DIR).glob("*.pem"))
    assert not list((tmp_path / "ca" / "previous").iterdir())
    assert new.retire_old() == []

    gateway = server_ctx(new)  # a gateway started after retire-old
    chain = (tmp_path / "ca" / "gateway" / "server.pem").read_text()
    assert chain.count("BEGIN CERTIFICATE") == 1
    renewed = agent_ctx(new.bundle_pems(), new, tmp_path, "renewed")
    handshake(gateway, renewed)
    with pytest.raises(ssl.SSLError):
        # The old agent cannot even verify the gateway now, nor would its certificate pass.
        handshake(gateway, old_agent)
    old_cert_new_trust = agent_ctx(new.bundle_pems(), None, tmp_path, "x")
    old_cert_new_trust.load_cert_chain(tmp_path / "old.pem", tmp_path / "old.key")
    with pytest.raises(ssl.SSLError):
        handshake(gateway, old_cert_new_trust)
    # Then the next rotation may start.
    CertificateAuthority.rotate(tmp_path / "ca")


def test_an_interrupted_rotation_is_resumed_with_the_same_new_ca(tmp_path):
    ca_dir = tmp_path / "ca"
    old, _ = CertificateAuthority.init(ca_dir)
    # What a crash right after writing the next CA's files leaves behind.
    key = generate_key()
    cert = CertificateAuthority._self_sign(key)
    from executor_plugin import pki

    pki.write_file_atomic(ca_dir / "ca.key.next", pki._key_pem(key))
    pki.write_file_atomic(ca_dir / "ca.pem.next", pki._pem(cert).encode(), 0o644)
    assert CertificateAuthority.load(ca_dir).pin == old.pin  # not switched in before it is trusted
    new, _ = CertificateAuthority.rotate(ca_dir)
    assert new.pin == spki_pin(pki._pem(cert))
    assert not (ca_dir / "ca.key.next").exists() and not (ca_dir / "ca.pem.next").exists()


def test_a_crash_between_the_two_renames_is_repaired_on_load(tmp_path):
    ca_dir = tmp_path / "ca"
    old, _ = CertificateAuthority.init(ca_dir)
    new, _ = CertificateAuthority.rotate(ca_dir)
    # Simulate: key switched, certificate not yet.
    os.replace(ca_dir / "ca.pem", ca_dir / "ca.pem.next")
    (ca_dir / "ca.pem").write_text(old.cert_pem)
    assert CertificateAuthority.load(ca_dir).pin == new.pin
    assert not (ca_dir / "ca.pem.next").exists()
    # Without a pending certificate, a mismatch stays an error.
    (ca_dir / "ca.pem").write_text(old.cert_pem)
    with pytest.raises(PKIError, match="does not belong"):
        CertificateAuthority.load(ca_dir)


def test_bundle_files_are_world_readable_and_the_key_is_not(tmp_path):
    CertificateAuthority.init(tmp_path / "ca")
    new, _ = CertificateAuthority.rotate(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    for path in (tmp_path / "ca" / BUNDLE_DIR).glob("*.pem"):
        assert path.stat().st_mode & 0o777 == 0o644
