"""The gateway's own server certificate: issued from our CA, kept 0600, re-issued when it must be."""

from __future__ import annotations

import ssl
from datetime import timedelta

from edge_agent.identity.pki_utils import load_cert
from executor_plugin.gateway.server import ServerCertificate, build_ssl_context, gateway_hosts
from executor_plugin.pki import CertificateAuthority, write_file_atomic


def _ca(tmp_path, name="ca"):
    return CertificateAuthority.init(tmp_path / name)[0]


def test_hosts_cover_bind_address_extra_names_and_loopback():
    assert gateway_hosts("10.1.2.3", ["gw.example.test"]) == ["10.1.2.3", "gw.example.test", "127.0.0.1", "localhost"]
    assert gateway_hosts("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert gateway_hosts("0.0.0.0")[0] not in ("0.0.0.0", "")


def test_issued_once_then_reused(tmp_path):
    server_cert = ServerCertificate(_ca(tmp_path), ["127.0.0.1", "localhost"])
    assert server_cert.ensure() is True
    assert server_cert.key_path.stat().st_mode & 0o777 == 0o600
    assert server_cert.dir.stat().st_mode & 0o777 == 0o700
    first = server_cert.cert_path.read_text()
    assert server_cert.ensure() is False
    assert server_cert.cert_path.read_text() == first


def test_reissued_when_near_expiry(tmp_path):
    ca = _ca(tmp_path)
    server_cert = ServerCertificate(ca, ["127.0.0.1"])
    cert_pem, key_pem = ca.issue_server_cert(["127.0.0.1"], timedelta(days=2))
    server_cert.dir.mkdir(mode=0o700)
    write_file_atomic(server_cert.key_path, key_pem.encode())
    write_file_atomic(server_cert.cert_path, cert_pem.encode())
    assert "expires" in (server_cert.problem() or "")
    assert server_cert.ensure() is True
    assert load_cert(server_cert.cert_path.read_bytes()).not_valid_after_utc > load_cert(cert_pem).not_valid_after_utc


def test_reissued_for_new_hosts_and_for_a_new_ca(tmp_path):
    ca = _ca(tmp_path)
    ServerCertificate(ca, ["127.0.0.1"]).ensure()
    wider = ServerCertificate(ca, ["127.0.0.1", "gw.example.test"])
    assert "gw.example.test" in (wider.problem() or "")
    assert wider.ensure() is True
    # Same directory, but the CA was replaced: the old certificate no longer chains.
    other = _ca(tmp_path, "other")
    moved = ServerCertificate(other, ["127.0.0.1", "gw.example.test"])
    moved.dir = wider.dir
    moved.cert_path, moved.key_path = wider.cert_path, wider.key_path
    assert moved.problem() == "not issued by the current CA"


def test_mismatched_key_is_repaired(tmp_path):
    ca = _ca(tmp_path)
    server_cert = ServerCertificate(ca, ["127.0.0.1"])
    server_cert.ensure()
    _, other_key = ca.issue_server_cert(["127.0.0.1"], timedelta(days=90))
    write_file_atomic(server_cert.key_path, other_key.encode())
    assert server_cert.problem() == "certificate and key do not match"
    assert server_cert.ensure() is True and server_cert.problem() is None


def test_tls_context_makes_client_certificates_optional(tmp_path):
    ca = _ca(tmp_path)
    server_cert = ServerCertificate(ca, ["127.0.0.1"])
    server_cert.ensure()
    ctx = build_ssl_context(ca, server_cert)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1


def test_two_gateways_issuing_at_once_never_mix_key_and_certificate(tmp_path) -> None:
    """Active/active gateways on one host share the CA directory and start together."""
    import ssl
    import threading

    from executor_plugin.gateway.server import ServerCertificate
    from executor_plugin.pki import CertificateAuthority

    CertificateAuthority.init(tmp_path / "ca")
    errors: list[BaseException] = []

    def start_one(i: int) -> None:
        try:
            for _ in range(5):
                cert = ServerCertificate(CertificateAuthority.load(tmp_path / "ca"), ["127.0.0.1", f"gw{i}.test"])
                cert.ensure()  # each host list differs: every call re-issues
                cert.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start_one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
