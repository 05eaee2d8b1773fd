"""What the keystore reads from certificates without ``cryptography``: validity dates and the key/certificate check.

``certinfo`` is checked against ``cryptography``'s parser on real certificates (trustme's, our CA's,
and hand-built ones with both DER time encodings and long-form lengths); ``tlskeys`` against
OpenSSL with real keys.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edge_agent.errors import ConfigError
from edge_agent.identity import certinfo, tlskeys
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.identity.pki_utils import generate_key, make_csr
from executor_plugin.pki import CertificateAuthority

UTC = timezone.utc


def _self_signed(not_before: datetime, not_after: datetime, *, key=None, long_name: bool = False) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")] + (
        [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"unit {i} " + "x" * 60) for i in range(6)]
        if long_name else []))
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _expected(pem: str) -> tuple[datetime, datetime]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _our_ca_leaf(tmp_path: Path) -> str:
    ca, _ = CertificateAuthority.init(tmp_path / "ca")
    cert_pem, _, _ = ca.sign_agent_csr(make_csr(generate_key(), "a"), agent_id="ag_certinfo1",
                                       trust_domain="t.test", ttl=timedelta(days=30))
    return cert_pem


def test_validity_matches_cryptography_on_real_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pems = {
        "trustme leaf": ca.issue_cert("agent.test").cert_chain_pems[0].bytes().decode(),
        "trustme CA": ca.cert_pem.bytes().decode(),
        "our CA's agent certificate": _our_ca_leaf(tmp_path),
        # UTCTime both ends; RSA makes the certificate longer than 256 bytes (two-byte lengths).
        "UTCTime, RSA": _self_signed(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
                                     datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), key=rsa_key),
        # RFC 5280: from 2050 on, GeneralizedTime; UTCTime "50".."99" means 19xx.
        "GeneralizedTime": _self_signed(datetime(1950, 1, 1, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC)),
        "long issuer name": _self_signed(datetime(2024, 2, 29, 12, 0, 1, tzinfo=UTC),
                                         datetime(2124, 2, 29, tzinfo=UTC), long_name=True),
    }
    for what, pem in pems.items():
        assert certinfo.validity(pem) == _expected(pem), what
        assert certinfo.validity(pem.encode()) == _expected(pem), what
        assert certinfo.not_after(pem) == _expected(pem)[1], what


def test_validity_reads_the_first_certificate_of_a_chain() -> None:
    first = _self_signed(datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC))
    second = _self_signed(datetime(2021, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC))
    assert certinfo.validity("some text before\n" + first + second) == _expected(first)


@pytest.mark.parametrize(
    "pem, message",
    [
        ("", "no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "not valid base64"),
        ("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "truncated"),
        ("-----BEGIN CERTIFICATE-----\nAgEB\n-----END CERTIFICATE-----\n", "expected 0x30"),  # an INTEGER
    ],
)
def test_unreadable_certificates_raise_value_error(pem: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        certinfo.validity(pem)


def test_a_certificate_cut_short_raises_value_error() -> None:
    pem = _self_signed(datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC))
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    import base64

    cut = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der[:60]).decode() + "\n-----END CERTIFICATE-----\n"
    with pytest.raises(ValueError, match="truncated"):
        certinfo.validity(cut)


# -- tlskeys ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leaf() -> trustme.LeafCert:
    return trustme.CA().issue_cert("agent.test")


def test_check_pair_accepts_a_matching_pair_and_names_a_mismatch(leaf: trustme.LeafCert) -> None:
    cert, key = leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()
    tlskeys.check_pair(cert, key)
    tlskeys.check_pair(cert.decode(), key)
    other = trustme.CA().issue_cert("other.test").private_key_pem.bytes()
    with pytest.raises(tlskeys.KeyMismatch):
        tlskeys.check_pair(cert, other)


@pytest.mark.parametrize("which", ["key", "cert"])
def test_check_pair_reports_unreadable_material(leaf: trustme.LeafCert, which: str) -> None:
    cert, key = leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()
    garbage = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="cannot be read") as err:
        tlskeys.check_pair(cert if which == "key" else garbage, garbage if which == "key" else key)
    assert not isinstance(err.value, tlskeys.KeyMismatch)


def test_an_encrypted_key_fails_instead_of_prompting(leaf: trustme.LeafCert) -> None:
    # Without a passphrase callback OpenSSL would read one from the terminal: a service would hang.
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ValueError, match="encrypted"):
        tlskeys.check_pair(leaf.cert_chain_pems[0].bytes(), encrypted)


def test_load_cert_chain_without_memfd_uses_a_private_file_that_is_gone_afterwards(
    leaf: trustme.LeafCert, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ssl
    import tempfile

    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tlskeys.load_cert_chain(ctx, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(tlskeys.KeyMismatch):
        tlskeys.check_pair(leaf.cert_chain_pems[0].bytes(), trustme.CA().issue_cert("x").private_key_pem.bytes())
    assert list(tmp_path.iterdir()) == []


# -- the keystore's start-up check ----------------------------------------------------------------


def _identity(leaf: trustme.LeafCert, ca_pem: str) -> StoredIdentity:
    return StoredIdentity(
        agent_id="ag_1", name="edge-1", queues=("q1",), region="eu", url="https://gw.test:8443",
        executor="executor_plugin.executor.EdgeAgentExecutor",
        cert_not_after=certinfo.not_after(leaf.cert_chain_pems[0].bytes()),
        cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(ca_pem,), key_pem=leaf.private_key_pem.bytes(),
    )


def test_keystore_load_reports_a_damaged_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    store = Keystore(tmp_path, "file")
    store.save(_identity(ca.issue_cert("agent.test"), ca.cert_pem.bytes().decode()))
    assert store.load().agent_id == "ag_1"
    (tmp_path / "agent.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="is damaged .*re-register with --force"):
        store.load()
