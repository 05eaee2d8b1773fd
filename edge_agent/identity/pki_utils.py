"""Key, CSR and certificate helpers shared by the agent and the gateway.

Imports only ``cryptography`` and the standard library: the agent's control process uses this
module, and it must stay free of Airflow, SQLAlchemy and FastAPI.

The CA pin is the SHA-256 of the DER SubjectPublicKeyInfo, the same value as kubeadm's discovery
hash and ``openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID


def _as_bytes(pem: str | bytes) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


def load_cert(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate (the first one if the text holds a chain)."""
    return x509.load_pem_x509_certificate(_as_bytes(pem))


def spki_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_pin(cert_pem: str | bytes) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo (32 raw bytes)."""
    return hashlib.sha256(spki_der(load_cert(cert_pem).public_key())).digest()


def pubkey_fingerprint(public_key: PublicKeyTypes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: how the server recognises a key across retries."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key (interoperable with TPMs, KMS/HSMs and cloud mTLS)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    """A PEM CSR signed by ``key``. The server ignores its subject; ``name`` only helps humans."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "edge-agent")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def cert_not_after(pem: str | bytes) -> datetime:
    """The certificate's expiry as an aware UTC datetime."""
    return load_cert(pem).not_valid_after_utc.astimezone(timezone.utc)


__all__ = [
    "cert_not_after",
    "generate_key",
    "load_cert",
    "make_csr",
    "pubkey_fingerprint",
    "spki_der",
    "spki_pin",
]
