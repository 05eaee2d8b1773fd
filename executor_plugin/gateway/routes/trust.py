"""``GET /agents/v1/trust-bundle``: the CA certificates agents must trust. Needs no certificate.

An agent fetches this over an unverified connection before registering and checks it against the
CA pin in its registration token, so nothing here has to be secret or authenticated.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from edge_agent.protocol import TRUST_BUNDLE_PATH, TrustBundle
from executor_plugin.gateway.routes import gateway_state

router = APIRouter()


@router.get(TRUST_BUNDLE_PATH, response_model=TrustBundle)
def trust_bundle(request: Request) -> TrustBundle:
    state = gateway_state(request)
    return TrustBundle(ca_pems=list(state.live_ca.snapshot.bundle_pems), trust_domain=state.settings.trust_domain)
