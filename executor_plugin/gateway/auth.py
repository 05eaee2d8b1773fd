"""Who is calling: the verified client certificate → an active agent row, checked on every request.

The TLS layer (CERT_OPTIONAL, our CA bundle) has already verified any certificate we see here; what
remains is to read the agent id from its SPIFFE URI and look the agent up, so that a revoked agent
is refused at once rather than when its certificate expires.

* no certificate, or one without an agent id of our trust domain → 401
* an agent id the database does not know → 401
* a revoked agent → 403

:func:`current_agent` applies this to agent API routes (a FastAPI dependency);
:class:`RequireAgentCertificate` applies it to Airflow's Execution API mounted at ``/execution``,
before Airflow sees the request.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request

from executor_plugin import store
from executor_plugin.gateway.routes import db, gateway_state
from executor_plugin.gateway.tls import TLS_EXTENSION
from executor_plugin.models import AgentStatus
from executor_plugin.pki import agent_id_from_cert

#: Key under which the parsed agent id is cached in the per-connection TLS extension dict.
_CACHE_KEY = "edge_agent.agent_id"


class AuthFailure(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def peer_agent_id(scope: dict[str, Any], trust_domain: str) -> str | None:
    """The agent id of the connection's client certificate, parsed once per connection."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION)
    if not tls:
        return None
    if _CACHE_KEY not in tls:
        der = tls.get("client_cert_der")
        tls[_CACHE_KEY] = agent_id_from_cert(der, trust_domain=trust_domain) if der else None
    return tls[_CACHE_KEY]


def _has_client_cert(scope: dict[str, Any]) -> bool:
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    return bool(tls.get("client_cert_der"))


async def authenticate(scope: dict[str, Any], trust_domain: str) -> store.Agent:
    """The calling agent, read fresh from the database; raises :class:`AuthFailure`."""
    if not _has_client_cert(scope):
        raise AuthFailure(401, "client certificate required")
    agent_id = peer_agent_id(scope, trust_domain)
    if agent_id is None:
        raise AuthFailure(401, "client certificate carries no agent identity of this deployment")
    agent = await db(store.get_agent, agent_id)
    if agent is None:
        raise AuthFailure(401, f"unknown agent {agent_id}: register it again")
    if agent.state == AgentStatus.REVOKED:
        raise AuthFailure(403, f"agent {agent_id} is revoked")
    return agent


async def current_agent(request: Request) -> store.Agent:
    """FastAPI dependency: the calling agent, or 401/403."""
    try:
        return await authenticate(request.scope, gateway_state(request).settings.trust_domain)
    except AuthFailure as exc:
        raise HTTPException(status_code=exc.status, detail=exc.detail) from None


class RequireAgentCertificate:
    """Pure ASGI middleware: refuse any HTTP request without an active agent's certificate."""

    def __init__(self, app: Any, trust_domain: str) -> None:
        self.app = app
        self.trust_domain = trust_domain

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        try:
            if scope["type"] != "http":
                raise AuthFailure(403, "only HTTP requests are served here")
            await authenticate(scope, self.trust_domain)
        except AuthFailure as exc:
            await _reply_json(send, exc.status, {"detail": exc.detail}, websocket=scope["type"] == "websocket")
            return
        await self.app(scope, receive, send)


async def _reply_json(send: Any, status: int, body: dict[str, Any], *, websocket: bool = False) -> None:
    if websocket:
        await send({"type": "websocket.close", "code": 1008})
        return
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


__all__ = ["AuthFailure", "RequireAgentCertificate", "authenticate", "current_agent", "peer_agent_id"]
