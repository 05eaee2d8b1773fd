"""The hosted side's certificate authority: create/load it, publish the trust bundle, sign agent
CSRs, and issue the gateway's own server certificate.

Layout of ``ca_dir`` (0700)::

    ca.key                 current CA private key (0600, written atomically)
    ca.pem                 current CA certificate
    bundle/<pin-hex>.pem   every CA certificate agents must trust (the current one and, during a
                           rotation, the previous one)
    previous/<pin-hex>.key during a rotation: the previous CA's key (0600), kept only to sign the
                           gateway's server certificate
    cross/<pin-hex>.pem    during a rotation: the previous CA's certificate signed by the current CA
    gateway/               the gateway's server certificate (managed by ``gateway/server.py``)

Rotation (``airflow edge-agents ca rotate``, then ``ca retire-old``): a new key and certificate
become current and join the bundle; the previous CA stays in the bundle, so client certificates of
both are accepted while agents renew (a renewal is signed by the new CA and brings the new bundle).
The gateway's server certificate must be verifiable by agents that trust only the previous CA (not
renewed yet) *and* by agents registering with a token pinned to the new CA (they trust only that
one until registered). So while the rotation lasts it is signed by the previous CA and sent with
the cross certificate (previous CA signed by the new one): old agents verify it directly, new ones
through the cross certificate. That is why a CA made by ``rotate`` allows one intermediate
(``pathLenConstraint`` 1; ``ca init`` makes 0, and the CA rotated away from needs none).
``retire_old`` drops every CA but the current one, the previous key and the cross certificate.

Agent certificates carry their identity only in the URI SAN ``spiffe://<trust-domain>/agent/<id>``;
whatever the CSR asks for is ignored, so an agent cannot choose its own name or widen its scope.

Errors: ``PKIError`` > ``CANotInitialised`` (no CA yet), ``CSRRejected`` (bad or foreign CSR),
``RotationInProgress`` (a second rotation before the first one was finished).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.fsutil import atomic_write, fsync_dir
from edge_agent.identity.pki_utils import generate_key, pubkey_fingerprint, spki_pin

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
#: Suffix of the next CA's files while a rotation writes them (an interrupted rotation resumes them).
NEXT_SUFFIX = ".next"
BUNDLE_DIR = "bundle"
CROSS_DIR = "cross"
PREVIOUS_DIR = "previous"
CA_VALIDITY = timedelta(days=3650)
#: Issued certificates start 5 minutes in the past so a peer whose clock runs a little behind
#: does not reject a certificate that is "not yet valid".
BACKDATE = timedelta(minutes=5)
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PKIError(Exception):
    """Base of every error raised by the CA."""


class CANotInitialised(PKIError):
    """There is no CA in the configured directory yet."""


class CSRRejected(PKIError):
    """The certificate signing request is malformed, badly signed, or uses a refused key type."""


class RotationInProgress(PKIError):
    """The bundle still holds a previous CA: finish that rotation (``ca retire-old``) first."""


#: Kept under this name for the gateway's server-certificate store.
write_file_atomic = atomic_write


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    # Two processes (the gateway starting and an admin running 'ca init') must not both create a CA.
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _host_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def spiffe_id(trust_domain: str, agent_id: str) -> str:
    return f"spiffe://{trust_domain}/agent/{agent_id}"


def agent_id_from_cert(cert: x509.Certificate | bytes, *, trust_domain: str) -> str | None:
    """The agent id in the certificate's ``spiffe://<trust_domain>/agent/<id>`` URI SAN, else None.

    ``cert`` is a parsed certificate or its DER bytes. A certificate of another trust domain (a
    second deployment sharing the CA by mistake) yields None, as does one with no or several ids.
    """
    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError:
            return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    prefix = f"spiffe://{trust_domain}/agent/"
    ids = [uri[len(prefix) :] for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(prefix)]
    if len(ids) != 1 or not _AGENT_ID_RE.match(ids[0]):
        return None
    return ids[0]


class CertificateAuthority:
    """An ECDSA P-256 CA kept as files in ``ca_dir``; build it with :meth:`init` or :meth:`load`."""

    def __init__(self, ca_dir: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.ca_dir = ca_dir
        self.key = key
        self.cert = cert
        self.cert_pem = _pem(cert)

    # -- creation and loading ----------------------------------------------------------------------

    @classmethod
    def init(cls, ca_dir: Path | str) -> tuple["CertificateAuthority", bool]:
        """Create the CA unless it exists; returns ``(ca, created)``. Safe to run repeatedly."""
        ca_dir = Path(ca_dir)
        ensure_private_dir(ca_dir)
        with _dir_lock(ca_dir):
            key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
            if key_path.exists() and cert_path.exists():
                return cls.load(ca_dir), False
            if cert_path.exists():
                raise PKIError(
                    f"{cert_path} exists but its key {key_path} is missing: restore the key, "
                    f"or move {ca_dir} aside to create a new CA (every agent must then re-register)"
                )
            if key_path.exists():
                # A crash between writing the key and the certificate: finish the job with that key.
                key = cls._read_key(key_path)
            else:
                key = generate_key()
                write_file_atomic(
                    key_path,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                )
            cert = cls._self_sign(key)
            pem = _pem(cert)
            write_file_atomic(ca_dir / BUNDLE_DIR / f"{spki_pin(pem).hex()}.pem", pem.encode(), 0o644)
            write_file_atomic(cert_path, pem.encode(), 0o644)
            log.info("created edge-agent CA in %s (pin sha256:%s)", ca_dir, spki_pin(pem).hex())
            return cls(ca_dir, key, cert), True

    @classmethod
    def load(cls, ca_dir: Path | str) -> "CertificateAuthority":
        ca_dir = Path(ca_dir)
        key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
        if not key_path.exists() or not cert_path.exists():
            raise CANotInitialised(f"no edge-agent CA in {ca_dir}: run 'airflow edge-agents ca init'")
        if key_path.stat().st_mode & 0o077:
            log.warning("CA key %s is readable by group or others; chmod 600 it", key_path)
        try:
            return cls._load_files(ca_dir)
        except _KeyCertMismatch:
            if not _next_path(ca_dir, CA_CERT_FILE).exists():
                raise PKIError(f"{cert_path} does not belong to the key in {key_path}") from None
        # A rotation stopped between switching the key and the certificate: finish it.
        with _dir_lock(ca_dir):
            _repair_half_switch(ca_dir)
            try:
                return cls._load_files(ca_dir)
            except _KeyCertMismatch:
                raise PKIError(f"{cert_path} does not belong to the key in {key_path}") from None

    @classmethod
    def _load_files(cls, ca_dir: Path) -> "CertificateAuthority":
        key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
        key = cls._read_key(key_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise PKIError(f"cannot read CA certificate {cert_path}: {exc}") from None
        if pubkey_fingerprint(cert.public_key()) != pubkey_fingerprint(key.public_key()):
            raise _KeyCertMismatch(str(cert_path))
        return cls(ca_dir, key, cert)

    @classmethod
    def rotate(cls, ca_dir: Path | str) -> tuple["CertificateAuthority", bytes]:
        """Make a new CA current, keeping the previous one trusted; returns ``(new_ca, old_pin)``.

        Order of the writes, each atomic: the next key and certificate, the new certificate in the
        bundle, the previous key and the cross certificate, then the switch (key, then
        certificate). A crash before the switch is resumed by the next ``rotate`` with the same new
        key; a crash between the two renames is repaired by :meth:`load`.
        """
        ca_dir = Path(ca_dir)
        cls.load(ca_dir)  # refuses a missing or broken CA before anything is written
        with _dir_lock(ca_dir):
            _repair_half_switch(ca_dir)
            old = cls._load_files(ca_dir)
            others = [pem for pem in old.bundle_pems()[1:] if not _is_pending_next(ca_dir, pem)]
            if others:
                raise RotationInProgress(
                    f"the trust bundle still holds {len(others)} previous CA certificate(s): run "
                    "'airflow edge-agents ca retire-old' once agents have renewed, then rotate again"
                )
            pending = _pending_next(ca_dir)
            if pending is not None:
                key, cert = pending  # an interrupted rotation: finish it with the same new CA
            else:
                key = generate_key()
                cert = cls._self_sign(key, path_length=1)
                write_file_atomic(_next_path(ca_dir, CA_KEY_FILE), _key_pem(key))
                write_file_atomic(_next_path(ca_dir, CA_CERT_FILE), _pem(cert).encode(), 0o644)
            new = cls(ca_dir, key, cert)
            write_file_atomic(ca_dir / BUNDLE_DIR / f"{new.pin.hex()}.pem", new.cert_pem.encode(), 0o644)
            ensure_private_dir(ca_dir / PREVIOUS_DIR)
            write_file_atomic(ca_dir / PREVIOUS_DIR / f"{old.pin.hex()}.key", _key_pem(old.key))
            cross = new._cross_sign(old.cert)
            write_file_atomic(ca_dir / CROSS_DIR / f"{old.pin.hex()}.pem", _pem(cross).encode(), 0o644)
            os.replace(_next_path(ca_dir, CA_KEY_FILE), ca_dir / CA_KEY_FILE)
            os.replace(_next_path(ca_dir, CA_CERT_FILE), ca_dir / CA_CERT_FILE)
            fsync_dir(ca_dir)
            log.info(
                "rotated edge-agent CA: sha256:%s is current, sha256:%s still trusted", new.pin.hex(), old.pin.hex()
            )
            return new, old.pin

    def retire_old(self) -> list[bytes]:
        """Drop every CA but the current one (as on disk now) from the bundle, with the previous key
        and the cross certificate; returns the pins removed."""
        with _dir_lock(self.ca_dir):
            current = self._load_files(self.ca_dir).pin
            removed: list[bytes] = []
            bundle_dir = self.ca_dir / BUNDLE_DIR
            for path in sorted(bundle_dir.glob("*.pem")) if bundle_dir.is_dir() else []:
                try:
                    pin = spki_pin(path.read_text())
                except (OSError, ValueError):
                    pin = None
                if pin != current:
                    path.unlink()
                    if pin is not None:
                        removed.append(pin)
            for sub in (CROSS_DIR, PREVIOUS_DIR):
                folder = self.ca_dir / sub
                for path in folder.iterdir() if folder.is_dir() else []:
                    path.unlink()
            fsync_dir(bundle_dir)
            return removed

    def _cross_sign(self, other: x509.Certificate) -> x509.Certificate:
        """``other`` (a CA certificate) re-signed by this CA: same subject, key and extensions."""
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(other.subject)
            .issuer_name(self.cert.subject)
            .public_key(other.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(other.not_valid_after_utc, self.cert.not_valid_after_utc))
        )
        for ext in other.extensions:
            if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
                builder = builder.add_extension(ext.value, ext.critical)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
        )
        return builder.sign(self.key, hashes.SHA256())

    # -- the gateway's server certificate during a rotation ----------------------------------------

    def previous(self) -> "CertificateAuthority | None":
        """The CA being rotated away from, while its key is kept (``rotate`` until ``retire_old``)."""
        folder = self.ca_dir / PREVIOUS_DIR
        bundle = {spki_pin(pem): pem for pem in self.bundle_pems()[1:]}
        for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
            pem = bundle.get(bytes.fromhex(path.stem)) if len(path.stem) == 64 else None
            if pem is None:
                continue
            try:
                key = self._read_key(path)
            except PKIError as exc:
                log.warning("skipping unreadable previous CA key %s: %s", path, exc)
                continue
            cert = x509.load_pem_x509_certificate(pem.encode())
            if pubkey_fingerprint(cert.public_key()) == pubkey_fingerprint(key.public_key()):
                return CertificateAuthority(self.ca_dir, key, cert)
        return None

    def server_issuer(self) -> "CertificateAuthority":
        """Who signs the gateway's server certificate: the previous CA during a rotation, else this one."""
        return self.previous() or self

    def server_chain_pems(self) -> list[str]:
        """Certificates sent after the gateway's server certificate: during a rotation, the previous
        CA cross-signed by this one (so agents that trust only this CA verify the gateway)."""
        issuer = self.server_issuer()
        if issuer is self:
            return []
        path = self.ca_dir / CROSS_DIR / f"{issuer.pin.hex()}.pem"
        try:
            cross = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning(
                "no usable cross certificate %s (%s): agents of the new CA cannot verify the gateway", path, exc
            )
            return []
        try:
            cross.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            log.warning("cross certificate %s is not signed by the current CA; not sent", path)
            return []
        return [_pem(cross)]

    @staticmethod
    def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise PKIError(f"cannot read CA key {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"CA key {path} is not an ECDSA key")
        return key

    @staticmethod
    def _self_sign(key: ec.EllipticCurvePrivateKey, path_length: int = 0) -> x509.Certificate:
        now = _now()
        pin8 = pubkey_fingerprint(key.public_key())[:8]
        # A distinct subject per CA keeps chain building unambiguous while two CAs are trusted.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent CA {pin8}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )

    # -- trust -------------------------------------------------------------------------------------

    @property
    def pin(self) -> bytes:
        """SHA-256 of the CA's SubjectPublicKeyInfo (the pin carried in registration tokens)."""
        return spki_pin(self.cert_pem)

    def bundle_certs(self) -> list[x509.Certificate]:
        certs = []
        for pem in self.bundle_pems():
            try:
                certs.append(x509.load_pem_x509_certificate(pem.encode()))
            except ValueError as exc:
                log.warning("skipping unreadable CA certificate in the bundle: %s", exc)
        return certs

    def bundle_pems(self) -> list[str]:
        """Every CA certificate agents should trust, the current CA first."""
        pems = [self.cert_pem]
        current = self.pin
        bundle_dir = self.ca_dir / BUNDLE_DIR
        for path in sorted(bundle_dir.glob("*.pem")) if bundle_dir.is_dir() else []:
            try:
                pem = path.read_text()
                if spki_pin(pem) != current:
                    pems.append(pem)
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable CA certificate %s: %s", path, exc)
        return pems

    # -- issuing -----------------------------------------------------------------------------------

    def _not_after(self, now: datetime, ttl: timedelta) -> datetime:
        # A leaf must not outlive the CA that signed it.
        return min(now + ttl, self.cert.not_valid_after_utc)

    def _leaf(
        self,
        subject_cn: str,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        eku: x509.ObjectIdentifier,
        ttl: timedelta,
    ) -> x509.Certificate:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(self._not_after(now, ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def sign_agent_csr(
        self, csr_pem: str | bytes, *, agent_id: str, trust_domain: str, ttl: timedelta
    ) -> tuple[str, str, datetime]:
        """Issue a client certificate for ``agent_id``; returns ``(cert_pem, serial_hex, not_after)``.

        Only the CSR's public key is used (after its signature proves possession of the key);
        subject and SANs come from the server's own records.
        """
        if not _AGENT_ID_RE.match(agent_id):
            raise PKIError(f"invalid agent id {agent_id!r}")
        public_key = verify_csr(csr_pem)
        cert = self._leaf(
            agent_id,
            public_key,
            [x509.UniformResourceIdentifier(spiffe_id(trust_domain, agent_id))],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ttl,
        )
        return _pem(cert), format(cert.serial_number, "x"), cert.not_valid_after_utc

    def issue_server_cert(self, hosts: list[str], ttl: timedelta) -> tuple[str, str]:
        """A new key and server certificate for ``hosts`` (IP SANs for IPs, DNS otherwise)."""
        if not hosts:
            raise PKIError("a server certificate needs at least one host name or address")
        key = generate_key()
        cert = self._leaf(hosts[0], key.public_key(), _host_names(hosts), ExtendedKeyUsageOID.SERVER_AUTH, ttl)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        return _pem(cert), key_pem


def issuer_pin(cert: x509.Certificate, cas: list[x509.Certificate]) -> bytes | None:
    """The pin of the CA in ``cas`` whose key signed ``cert``, or None."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return bytes.fromhex(pubkey_fingerprint(ca.public_key()))
    return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _next_path(ca_dir: Path, name: str) -> Path:
    return ca_dir / f"{name}{NEXT_SUFFIX}"


def _pending_next(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The next CA's key and certificate left by an interrupted rotation, if both are there and match."""
    key_path, cert_path = _next_path(ca_dir, CA_KEY_FILE), _next_path(ca_dir, CA_CERT_FILE)
    if not (key_path.exists() and cert_path.exists()):
        return None
    try:
        key = CertificateAuthority._read_key(key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (PKIError, ValueError, OSError):
        return None
    if pubkey_fingerprint(cert.public_key()) != pubkey_fingerprint(key.public_key()):
        return None
    return key, cert


def _is_pending_next(ca_dir: Path, pem: str) -> bool:
    pending = _pending_next(ca_dir)
    return pending is not None and spki_pin(_pem(pending[1])) == spki_pin(pem)


def _repair_half_switch(ca_dir: Path) -> None:
    """Finish a rotation that switched the key but not the certificate (caller holds the lock)."""
    cert_next = _next_path(ca_dir, CA_CERT_FILE)
    if not cert_next.exists() or _next_path(ca_dir, CA_KEY_FILE).exists():
        return  # nothing switched yet: the next 'ca rotate' resumes it
    try:
        key = CertificateAuthority._read_key(ca_dir / CA_KEY_FILE)
        cert = x509.load_pem_x509_certificate(cert_next.read_bytes())
    except (PKIError, ValueError, OSError):
        return
    if pubkey_fingerprint(cert.public_key()) == pubkey_fingerprint(key.public_key()):
        os.replace(cert_next, ca_dir / CA_CERT_FILE)
        fsync_dir(ca_dir)


class _KeyCertMismatch(PKIError):
    pass


def verify_csr(csr_pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parse a PEM CSR, check its self-signature and key type; returns its P-256 public key."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected(f"not a PEM certificate signing request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CSRRejected(f"unsupported public key in CSR: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise CSRRejected("only ECDSA P-256 keys are accepted")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CSRRejected("CSR signature does not verify: the request was altered or not signed by its key")
    return public_key


__all__ = [
    "BUNDLE_DIR",
    "CROSS_DIR",
    "PREVIOUS_DIR",
    "CANotInitialised",
    "CSRRejected",
    "CertificateAuthority",
    "PKIError",
    "RotationInProgress",
    "agent_id_from_cert",
    "ensure_private_dir",
    "issuer_pin",
    "spiffe_id",
    "verify_csr",
    "write_file_atomic",
]
