"""Identity routes: ``POST /agents/v1/register`` (token + CSR → certificate, no client certificate
needed) and ``GET /agents/v1/whoami``.

Registration order, each step refusing before the next runs: token format (400), token minted for
this CA (401), CSR well-formed, self-signed and P-256 (400), token secret, expiry and uses (401).
A retry with the same token and the same key finds the agent made the first time (its response may
have been lost) and gets a fresh certificate; another key on a used-up token is refused. Queues and
region come from the token record, never from the request.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.orm import Session

from edge_agent.identity.pki_utils import pubkey_fingerprint, spki_pin
from edge_agent.protocol import (
    REGISTER_PATH,
    WHOAMI_PATH,
    AgentIdentity,
    RegisterRequest,
    RegistrationToken,
    TokenFormatError,
    WhoAmI,
)
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.routes import GatewayState, db, gateway_state
from executor_plugin.pki import CSRRejected, verify_csr

router = APIRouter()


def new_agent_id() -> str:
    return f"ag_{secrets.token_hex(6)}"


def _enroll(
    session: Session, state: GatewayState, token: RegistrationToken, csr_pem: str, pubkey_fp: str, name: str | None
) -> tuple[store.Agent, str, datetime]:
    token_rec, agent = store.redeem_token(session, token_id=token.token_id, secret=token.secret, pubkey_fp=pubkey_fp)
    if agent is None:
        agent_id = new_agent_id()
        agent = store.create_agent(
            session, agent_id=agent_id, name=name or token_rec.name or agent_id, token=token_rec, pubkey_fp=pubkey_fp
        )
    ca = state.ca
    cert_pem, serial, not_after = ca.sign_agent_csr(
        csr_pem, agent_id=agent.id, trust_domain=state.settings.trust_domain, ttl=state.settings.cert_ttl
    )
    store.set_agent_cert(session, agent.id, serial=serial, not_after=not_after, issuer=ca.pin.hex())
    return agent, cert_pem, not_after


@router.post(REGISTER_PATH, response_model=AgentIdentity)
async def register(body: RegisterRequest, request: Request) -> AgentIdentity:
    state = gateway_state(request)
    try:
        token = RegistrationToken.parse(body.token)
    except TokenFormatError as exc:
        raise HTTPException(400, str(exc)) from None
    bundle = list(state.live_ca.snapshot.bundle_pems)
    if not any(hmac.compare_digest(token.ca_pin, spki_pin(pem)) for pem in bundle):
        raise HTTPException(401, "registration token was minted for another CA (its pin does not match)")
    try:
        public_key = verify_csr(body.csr_pem)
    except CSRRejected as exc:
        raise HTTPException(400, f"bad certificate signing request: {exc}") from None
    try:
        agent, cert_pem, not_after = await db(
            _enroll, state, token, body.csr_pem, pubkey_fingerprint(public_key), body.name
        )
    except store.TokenRejected as exc:
        raise HTTPException(401, exc.reason) from None
    return AgentIdentity(
        agent_id=agent.id,
        name=agent.name,
        queues=list(agent.queues),
        region=agent.region,
        cert_pem=cert_pem,
        ca_pems=bundle,
        cert_not_after=not_after,
        executor=state.settings.executor,
    )


@router.get(WHOAMI_PATH, response_model=WhoAmI)
async def whoami(agent: store.Agent = Depends(current_agent)) -> WhoAmI:
    return WhoAmI(
        agent_id=agent.id,
        name=agent.name,
        queues=list(agent.queues),
        region=agent.region,
        state=agent.state,
        cert_not_after=agent.cert_not_after,
    )
