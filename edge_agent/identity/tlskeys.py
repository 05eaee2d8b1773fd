"""Loads a PEM certificate and private key into an ``ssl.SSLContext``, and checks a pair, with ``ssl`` alone.

* ``ssl`` loads a key only from a path. The pair goes into an anonymous in-memory file (``memfd``)
  where the OS has one, so a key kept in the keyring never touches the filesystem; elsewhere into
  a private temporary file that exists only for the call. OpenSSL copies the key into the context.
* :func:`check_pair` is OpenSSL's own test (``KEY_VALUES_MISMATCH``), the one a handshake with a
  mismatched pair would fail on. The control process runs it at every start; doing it with
  ``cryptography`` instead kept that library (about 8 MB RSS) loaded for the life of the process.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path


class KeyMismatch(ValueError):
    """The private key is not the key of the certificate."""


def _no_passphrase() -> bytes:
    # Our keys are never encrypted. Without a callback, OpenSSL would prompt on the terminal for the
    # passphrase of an encrypted key, and a service would hang at start instead of failing.
    raise ValueError("the private key is encrypted; edge-agent keys never are")


def load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Put the certificate (chain) and its key into ``ctx``; raises ``ssl.SSLError`` or ValueError."""
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edge-agent-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=_no_passphrase)
            return
        except FileNotFoundError:
            pass  # no /proc (some sandboxes): fall back to a private temporary file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="edge-agent-tls-") as tmp:  # created 0700
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        ctx.load_cert_chain(str(path), password=_no_passphrase)


def check_pair(cert_pem: str | bytes, key_pem: bytes) -> None:
    """Raise :class:`KeyMismatch` if the key is not the certificate's, ValueError if either cannot be read."""
    cert = cert_pem.encode("ascii") if isinstance(cert_pem, str) else cert_pem
    try:
        load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key_pem)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise KeyMismatch("the private key does not belong to the certificate") from None
        raise ValueError(f"the certificate or the private key cannot be read ({exc.reason or exc})") from None


__all__ = ["KeyMismatch", "check_pair", "load_cert_chain"]
