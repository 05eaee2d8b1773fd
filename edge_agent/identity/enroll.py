"""The register flow: turn a one-time token into a stored identity (key, certificate, CA bundle).

1. Parse the token locally (format, checksum): a typo fails here, before any network traffic.
2. Fetch the trust bundle over TLS *without* verification and keep only the CA certificates whose
   SPKI pin equals the one in the token. None matches: :class:`PinMismatch`, and the secret was never
   sent (kubeadm's discovery hash). Only the pinned CAs are trusted for step 3: a bundle that adds a
   foreign CA next to the real one gains nothing.
3. Generate a P-256 key here (it never leaves this machine), send a CSR with the token over TLS
   verified against the pinned CAs, host name checked. A lost response is retried with the *same*
   key and CSR: the gateway treats that as the same registration.
4. Check the returned certificate is for our key, then store key, certificate and bundle.
"""

from __future__ import annotations

import hmac
import logging
import socket
import time
from typing import Callable

from edge_agent.backoff import Backoff
from edge_agent.errors import (
    ConfigError,
    GatewayUnreachable,
    IdentityError,
    PinMismatch,
    ServerError,
    TokenInvalid,
)
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.protocol import RegisterRequest, RegistrationToken, TokenFormatError

log = logging.getLogger(__name__)


def register(
    url: str,
    token_text: str,
    name: str | None,
    keystore: Keystore,
    version: str,
    *,
    replace: bool = False,
    timeout: float = 30.0,
    attempts: int = 4,
    sleep: Callable[[float], None] = time.sleep,
) -> StoredIdentity:
    """Register this agent with the gateway at ``url`` and store the identity in ``keystore``."""
    from cryptography.hazmat.primitives import serialization

    from edge_agent.client import AgentAPI
    from edge_agent.identity import pki_utils
    from edge_agent.transport import build_bootstrap_client, normalize_url

    try:
        token = RegistrationToken.parse(token_text)
    except TokenFormatError as exc:
        raise TokenInvalid(str(exc)) from None
    base = normalize_url(url)
    if keystore.exists() and not replace:
        raise ConfigError(
            f"{keystore.state_dir} already holds an identity; pass --force to replace it, or use another --state-dir"
        )
    # A token is single-use: find out now, not after spending it, that the key cannot be stored.
    keystore.prepare()

    # -- 2. trust bundle, unverified; pin check before the secret goes anywhere ------------------
    api = AgentAPI(build_bootstrap_client(base, None, timeout))
    try:
        bundle = api.trust_bundle()
    finally:
        api.close()
    pinned = [pem for pem in bundle.ca_pems if _pin_matches(pem, token.ca_pin)]
    if not pinned:
        raise PinMismatch(base)

    # -- 3. key, CSR, register over verified TLS ---------------------------------------------------
    key = pki_utils.generate_key()
    csr_pem = pki_utils.make_csr(key, name or socket.gethostname())
    request = RegisterRequest(token=str(token), csr_pem=csr_pem, name=name, version=version)
    api = AgentAPI(build_bootstrap_client(base, pinned, timeout))
    backoff = Backoff(base=1.0, cap=10.0)
    try:
        for attempt in range(1, attempts + 1):
            try:
                issued = api.register(request)
                break
            except (GatewayUnreachable, ServerError) as exc:
                if attempt == attempts:
                    raise
                delay = backoff.next()
                log.warning("registration attempt %d failed (%s); retrying with the same key in %.1fs",
                            attempt, exc, delay)
                sleep(delay)
    finally:
        api.close()

    # -- 4. check and store ------------------------------------------------------------------------
    cert = pki_utils.load_cert(issued.cert_pem)
    if pki_utils.pubkey_fingerprint(cert.public_key()) != pki_utils.pubkey_fingerprint(key.public_key()):
        raise IdentityError("the gateway returned a certificate for another key; registration not stored")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    identity = StoredIdentity(
        agent_id=issued.agent_id,
        name=issued.name,
        queues=tuple(issued.queues),
        region=issued.region,
        url=base,
        executor=issued.executor,
        cert_not_after=pki_utils.cert_not_after(issued.cert_pem),
        cert_pem=issued.cert_pem,
        # The bundle in the reply came over the verified channel; it may carry a second CA during a
        # CA rotation. Fall back to what we pinned if the gateway sent none.
        ca_pems=tuple(issued.ca_pems or pinned),
        key_pem=key_pem,
    )
    keystore.save(identity)
    log.info("registered as %s (%s) with %s", identity.agent_id, identity.name, base)
    return identity


def _pin_matches(pem: str, expected: bytes) -> bool:
    from edge_agent.identity.pki_utils import spki_pin

    try:
        pin = spki_pin(pem)
    except (ValueError, TypeError):
        return False  # an unparsable "CA" simply does not match
    return hmac.compare_digest(pin, expected)


__all__ = ["register"]
