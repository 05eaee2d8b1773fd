"""The validity dates of an X.509 certificate, read with the standard library only.

The agent's control process needs a certificate's ``notBefore`` and ``notAfter`` at every start
(the renewal schedule) but nothing else from it. Importing ``cryptography`` for that costs about
8 MB of RSS for the life of the process (docs/benchmarks.md, §3), so this module walks the few DER
fields in front of the validity instead (RFC 5280, 4.1)::

    Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    TBSCertificate ::= SEQUENCE { [0] EXPLICIT version OPTIONAL, serialNumber INTEGER,
                                  signature AlgorithmIdentifier, issuer Name, validity Validity, ... }
    Validity ::= SEQUENCE { notBefore Time, notAfter Time }
    Time ::= UTCTime "YYMMDDHHMMSSZ" | GeneralizedTime "YYYYMMDDHHMMSSZ"

Anything else raises ``ValueError``: a certificate this cannot read is one TLS could not use either.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone

_BEGIN = "-----BEGIN CERTIFICATE-----"
_END = "-----END CERTIFICATE-----"

_SEQUENCE, _INTEGER, _UTC_TIME, _GENERALIZED_TIME, _EXPLICIT_0 = 0x30, 0x02, 0x17, 0x18, 0xA0


def validity(pem: str | bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of the first certificate in ``pem``, as aware UTC datetimes."""
    der = _first_der(pem)
    _, cert_start, _ = _expect(der, 0, _SEQUENCE, "Certificate")
    _, pos, _ = _expect(der, cert_start, _SEQUENCE, "TBSCertificate")
    tag, _, end = _tlv(der, pos)
    if tag == _EXPLICIT_0:  # version; absent means v1
        pos = end
    pos = _expect(der, pos, _INTEGER, "serialNumber")[2]
    pos = _expect(der, pos, _SEQUENCE, "signature")[2]
    pos = _expect(der, pos, _SEQUENCE, "issuer")[2]
    _, pos, validity_end = _expect(der, pos, _SEQUENCE, "validity")
    not_before, pos = _time(der, pos)
    not_after, pos = _time(der, pos)
    if pos != validity_end:
        raise ValueError("certificate validity has extra fields")
    return not_before, not_after


def not_after(pem: str | bytes) -> datetime:
    """The certificate's expiry as an aware UTC datetime."""
    return validity(pem)[1]


def _first_der(pem: str | bytes) -> bytes:
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    start = text.find(_BEGIN)
    end = text.find(_END, start)
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate found")
    try:
        return base64.b64decode("".join(text[start + len(_BEGIN) : end].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"PEM certificate is not valid base64: {exc}") from None


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``pos``."""
    if pos + 2 > len(der):
        raise ValueError("certificate is truncated")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4:
            raise ValueError("certificate has an invalid DER length")
        if pos + n > len(der):
            raise ValueError("certificate is truncated")
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("certificate is truncated")
    return tag, pos, pos + length


def _expect(der: bytes, pos: int, tag: int, what: str) -> tuple[int, int, int]:
    found = _tlv(der, pos)
    if found[0] != tag:
        raise ValueError(f"certificate field {what} has DER tag {found[0]:#04x}, expected {tag:#04x}")
    return found


def _time(der: bytes, pos: int) -> tuple[datetime, int]:
    tag, start, end = _tlv(der, pos)
    text = der[start:end].decode("ascii", errors="replace")
    if tag == _UTC_TIME and len(text) == 13:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"  # RFC 5280, 4.1.2.5.1
    elif not (tag == _GENERALIZED_TIME and len(text) == 15):
        raise ValueError(f"certificate time {text!r} is not a DER UTCTime or GeneralizedTime")
    try:
        value = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    except ValueError:
        raise ValueError(f"certificate time {text!r} is not a valid date") from None
    return value.replace(tzinfo=timezone.utc), end


__all__ = ["not_after", "validity"]
