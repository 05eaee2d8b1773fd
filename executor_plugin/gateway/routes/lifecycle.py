"""An agent's identity after registration: ``POST /agents/v1/renew`` and ``DELETE /agents/v1/self``.

* **Renew**: under its current, still valid certificate the agent sends a CSR for a *new* key (the
  key of the presented certificate is refused, 400). The reply is an ``AgentIdentity`` for the same
  agent id, queues and region, with a certificate signed by the current CA (so renewals move agents
  onto a rotated CA) and the current trust bundle. The previous certificate keeps working until it
  expires; the agent row records the new serial, expiry, issuer and key. A lost reply is safe to
  retry with the same CSR.
* **Self**: the agent removes itself (``edge-agent unregister``): its row is marked revoked, so its
  certificate is refused from then on, and its leased jobs go back to the queue. Jobs it still runs
  are left to Airflow's task heartbeat timeout (their Execution API calls are refused now).
"""

from __future__ import annotations

import logging
from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from sqlalchemy.orm import Session

from edge_agent.identity.pki_utils import pubkey_fingerprint
from edge_agent.protocol import RENEW_PATH, SELF_PATH, AgentIdentity, RenewRequest
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.routes import GatewayState, db, gateway_state
from executor_plugin.gateway.tls import TLS_EXTENSION
from executor_plugin.pki import CSRRejected, verify_csr

log = logging.getLogger(__name__)
router = APIRouter()


def _presented_key_fp(request: Request) -> str | None:
    from cryptography import x509

    der = ((request.scope.get("extensions") or {}).get(TLS_EXTENSION) or {}).get("client_cert_der")
    if not der:
        return None
    return pubkey_fingerprint(x509.load_der_x509_certificate(der).public_key())


def _renew(
    session: Session, state: GatewayState, agent: store.Agent, csr_pem: str, pubkey_fp: str
) -> tuple[store.Agent, str, datetime]:
    ca = state.ca
    cert_pem, serial, not_after = ca.sign_agent_csr(
        csr_pem, agent_id=agent.id, trust_domain=state.settings.trust_domain, ttl=state.settings.cert_ttl
    )
    renewed = store.renew_agent_cert(
        session, agent.id, serial=serial, not_after=not_after, issuer=ca.pin.hex(), pubkey_fp=pubkey_fp
    )
    return renewed, cert_pem, not_after


@router.post(RENEW_PATH, response_model=AgentIdentity)
async def renew(body: RenewRequest, request: Request, agent: store.Agent = Depends(current_agent)) -> AgentIdentity:
    state = gateway_state(request)
    try:
        public_key = verify_csr(body.csr_pem)
    except CSRRejected as exc:
        raise HTTPException(400, f"bad certificate signing request: {exc}") from None
    new_fp = pubkey_fingerprint(public_key)
    if new_fp == _presented_key_fp(request):
        # A rotation that keeps the key would leave a stolen key valid across renewals.
        raise HTTPException(400, "renewal needs a new key: the CSR uses the key of the certificate presented")
    try:
        renewed, cert_pem, not_after = await db(_renew, state, agent, body.csr_pem, new_fp)
    except store.AgentRevoked:
        raise HTTPException(403, f"agent {agent.id} is revoked") from None
    log.info("renewed the certificate of agent %s (expires %s)", agent.id, not_after.isoformat())
    return AgentIdentity(
        agent_id=renewed.id,
        name=renewed.name,
        queues=list(renewed.queues),
        region=renewed.region,
        cert_pem=cert_pem,
        ca_pems=list(state.live_ca.snapshot.bundle_pems),
        cert_not_after=not_after,
        executor=state.settings.executor,
    )


@router.delete(SELF_PATH, status_code=204, response_class=Response)
async def unregister(agent: store.Agent = Depends(current_agent)) -> Response:
    revocation = await db(store.revoke_agent, agent.id)
    log.info(
        "agent %s unregistered itself: %d leased job(s) requeued, %d running job(s) left to Airflow",
        agent.id,
        revocation.requeued,
        len(revocation.running),
    )
    return Response(status_code=204)
