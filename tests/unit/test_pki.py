"""The CA (``executor_plugin.pki``) and the shared helpers (``edge_agent.identity.pki_utils``)."""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from edge_agent.identity.pki_utils import (
    cert_not_after,
    generate_key,
    load_cert,
    make_csr,
    pubkey_fingerprint,
    spki_pin,
)
from executor_plugin.pki import (
    BUNDLE_DIR,
    CANotInitialised,
    CertificateAuthority,
    CSRRejected,
    PKIError,
    agent_id_from_cert,
)

DOMAIN = "unit.edge-agent.test"
AGENT = "ag_0123456789ab"


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.init(tmp_path / "ca")[0]


def _sign(ca, csr_pem, ttl=timedelta(hours=2)):
    return ca.sign_agent_csr(csr_pem, agent_id=AGENT, trust_domain=DOMAIN, ttl=ttl)


def _csr(key, builder_extra=None, name="agent"):
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if builder_extra:
        builder = builder_extra(builder)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


# -- creation, loading, files -------------------------------------------------------------------------


def test_init_is_idempotent_and_protects_the_key(tmp_path):
    ca_dir = tmp_path / "ca"
    ca, created = CertificateAuthority.init(ca_dir)
    again, created_again = CertificateAuthority.init(ca_dir)
    assert created and not created_again
    assert again.pin == ca.pin
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]
    cert = ca.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)


def test_load_without_ca_says_how_to_create_one(tmp_path):
    with pytest.raises(CANotInitialised, match="run 'airflow edge-agents ca init'"):
        CertificateAuthority.load(tmp_path / "nothing")


def test_init_finishes_after_a_crash_between_key_and_cert(tmp_path):
    ca, _ = CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "ca" / "ca.pem").unlink()
    again, created = CertificateAuthority.init(tmp_path / "ca")
    assert created and again.pin == ca.pin  # same key, new certificate


def test_cert_without_key_is_an_error_not_a_new_ca(tmp_path):
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(PKIError, match="key"):
        CertificateAuthority.init(tmp_path / "ca")


def test_bundle_lists_current_ca_first_then_others(tmp_path, ca):
    old = CertificateAuthority.init(tmp_path / "old")[0]
    (ca.ca_dir / BUNDLE_DIR / "0000-old.pem").write_text(old.cert_pem)  # sorts before the current file
    pems = ca.bundle_pems()
    assert [spki_pin(p) for p in pems] == [ca.pin, old.pin]


# -- pins and helpers ----------------------------------------------------------------------------------


def test_pin_is_sha256_of_the_spki_der(ca):
    spki = ca.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ca.pin == hashlib.sha256(spki).digest() == spki_pin(ca.cert_pem.encode())
    assert pubkey_fingerprint(ca.cert.public_key()) == ca.pin.hex()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_pin_matches_the_openssl_pipeline(tmp_path, ca):
    # openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256 (kubeadm's discovery hash)
    pub = subprocess.run(
        ["openssl", "x509", "-pubkey", "-noout"], input=ca.cert_pem.encode(), capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True, check=True
    ).stdout
    assert hashlib.sha256(der).digest() == ca.pin


def test_helpers():
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(make_csr(key, "my-host").encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "my-host"


# -- agent certificates --------------------------------------------------------------------------------


def test_agent_certificate_ignores_csr_names(ca):
    key = generate_key()

    def ask_for_more(builder):
        return builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("evil.example"), x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/agent/admin")]
            ),
            critical=False,
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)

    before = datetime.now(timezone.utc)
    cert_pem, serial, not_after = _sign(ca, _csr(key, ask_for_more, name="admin"))
    cert = load_cert(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == AGENT
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/agent/{AGENT}")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert pubkey_fingerprint(cert.public_key()) == pubkey_fingerprint(key.public_key())
    assert serial == format(cert.serial_number, "x")
    assert not_after == cert.not_valid_after_utc == cert_not_after(cert_pem)
    assert cert_not_after(cert_pem).tzinfo is not None
    assert cert.not_valid_before_utc <= before - timedelta(minutes=4)  # backdated for clock skew
    assert before + timedelta(hours=2) - timedelta(minutes=1) <= not_after <= before + timedelta(hours=2, minutes=1)
    assert agent_id_from_cert(cert, trust_domain=DOMAIN) == AGENT
    assert agent_id_from_cert(cert.public_bytes(serialization.Encoding.DER), trust_domain=DOMAIN) == AGENT
    assert agent_id_from_cert(cert, trust_domain="other.test") is None


def test_agent_certificate_verifies_for_client_auth(ca):
    cert_pem, _, _ = _sign(ca, make_csr(generate_key(), "x"))
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    verified = verifier.verify(load_cert(cert_pem), [])
    assert verified.subjects == [x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/agent/{AGENT}")]


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate()],
    ids=["p384", "rsa", "ed25519"],
)
def test_only_p256_keys_are_accepted(ca, key):
    with pytest.raises(CSRRejected, match="P-256"):
        _sign(ca, _csr(key))


def test_csr_with_a_bad_signature_is_refused(ca):
    csr = x509.load_pem_x509_csr(make_csr(generate_key(), "x").encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value: still parses, no longer verifies
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CSRRejected, match="signature"):
        _sign(ca, tampered)


def test_csr_signed_by_another_key_is_refused(ca):
    # The CSR names one key but is signed by another: no proof of possession.
    victim, attacker = generate_key(), generate_key()
    good = x509.load_pem_x509_csr(_csr(attacker).encode())
    victim_spki = victim.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    attacker_spki = attacker.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    swapped = good.public_bytes(serialization.Encoding.DER).replace(attacker_spki, victim_spki)
    assert swapped != good.public_bytes(serialization.Encoding.DER)
    pem = x509.load_der_x509_csr(swapped).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CSRRejected):
        _sign(ca, pem)


@pytest.mark.parametrize("text", ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
def test_garbage_csr_is_refused(ca, text):
    with pytest.raises(CSRRejected):
        _sign(ca, text)


def test_invalid_agent_id_is_refused(ca):
    with pytest.raises(PKIError):
        ca.sign_agent_csr(make_csr(generate_key(), "x"), agent_id="../admin", trust_domain=DOMAIN, ttl=timedelta(hours=1))


def test_leaf_never_outlives_the_ca(ca):
    _, _, not_after = _sign(ca, make_csr(generate_key(), "x"), ttl=timedelta(days=365 * 50))
    assert not_after <= ca.cert.not_valid_after_utc


# -- server certificate --------------------------------------------------------------------------------


def test_server_certificate_names_and_usage(ca):
    cert_pem, key_pem = ca.issue_server_cert(["gw.example.test", "127.0.0.1", "localhost", "::1"], timedelta(days=1))
    cert = load_cert(cert_pem)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert pubkey_fingerprint(cert.public_key()) == pubkey_fingerprint(key.public_key())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = PolicyBuilder().store(Store([ca.cert])).build_server_verifier(x509.DNSName("gw.example.test"))
    verifier.verify(cert, [])
