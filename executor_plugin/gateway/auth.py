"""Who is calling: the verified client certificate → an active agent row, checked on every request.

The TLS layer (CERT_OPTIONAL, our CA bundle) has already verified any certificate we see here; what
remains is to read the agent id from its SPIFFE URI and look the agent up, so that a revoked agent
is refused at once rather than when its certificate expires.

* no certificate, or one without an agent id of our trust domain → 401
* a certificate whose CA was retired from the bundle (the TLS context of a running gateway still
  holds it until restart) → 401
* an agent id the database does not know → 401
* a revoked agent → 403

:func:`current_agent` applies this to agent API routes (a FastAPI dependency);
:class:`RequireAgentCertificate` applies it to Airflow's Execution API mounted at ``/execution``,
before Airflow sees the request, and adds the **task binding**: a request must carry a task token
(bearer JWT) whose subject is a task instance leased to, or run by, the calling agent; otherwise
403 ``task instance is not leased to this agent`` and Airflow never sees it. The token is only
*read* here, to find the task instance; Airflow still validates it. ``/execution/health`` needs
no task token. A granted binding is remembered for :data:`BINDING_CACHE_SECONDS` per (agent, task
instance), so a task's many calls cost one query every few seconds; the agent row is still read on
every request, so a revocation applies at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request

from executor_plugin import store
from executor_plugin.gateway.routes import db, gateway_state
from executor_plugin.gateway.tls import TLS_EXTENSION
from executor_plugin.models import AgentStatus
from executor_plugin.pki import agent_id_from_cert, issuer_pin

if TYPE_CHECKING:
    from executor_plugin.gateway.routes import GatewayState

#: Keys under which parsed results are cached in the per-connection TLS extension dict.
_CACHE_KEY = "edge_agent.agent_id"
_ISSUER_KEY = "edge_agent.issuer_pin"
#: How long a granted Execution API binding is reused before the job table is asked again. A lease
#: that moved to another agent is refused to the old holder after at most this long.
BINDING_CACHE_SECONDS = 2.0
_BINDING_CACHE_MAX = 10_000
#: Longest bearer token read (Airflow's task tokens are well under 1 KB).
_MAX_TOKEN_CHARS = 8192
NOT_LEASED = "task instance is not leased to this agent"


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


def peer_issuer_pin(scope: dict[str, Any], cas: tuple) -> bytes | None:
    """Pin of the CA (among ``cas``) that signed the connection's client certificate."""
    from cryptography import x509

    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    if tls.get(_ISSUER_KEY) is None:
        der = tls.get("client_cert_der")
        if not der:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        # Cached only once found: the issuer of a certificate never changes, the bundle may.
        tls[_ISSUER_KEY] = issuer_pin(cert, list(cas))
    return tls[_ISSUER_KEY]


def _has_client_cert(scope: dict[str, Any]) -> bool:
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    return bool(tls.get("client_cert_der"))


async def authenticate(scope: dict[str, Any], state: "GatewayState") -> store.Agent:
    """The calling agent, read fresh from the database; raises :class:`AuthFailure`."""
    if not _has_client_cert(scope):
        raise AuthFailure(401, "client certificate required")
    agent_id = peer_agent_id(scope, state.settings.trust_domain)
    if agent_id is None:
        raise AuthFailure(401, "client certificate carries no agent identity of this deployment")
    snapshot = state.live_ca.snapshot
    if peer_issuer_pin(scope, snapshot.bundle_certs) not in snapshot.bundle_pins:
        raise AuthFailure(
            401, "client certificate was issued by a CA this gateway no longer trusts: register the agent again"
        )
    agent = await db(store.get_agent, agent_id)
    if agent is None:
        raise AuthFailure(401, f"unknown agent {agent_id}: register it again")
    if agent.state == AgentStatus.REVOKED:
        raise AuthFailure(403, f"agent {agent_id} is revoked")
    return agent


async def current_agent(request: Request) -> store.Agent:
    """FastAPI dependency: the calling agent, or 401/403."""
    try:
        return await authenticate(request.scope, gateway_state(request))
    except AuthFailure as exc:
        raise HTTPException(status_code=exc.status, detail=exc.detail) from None


def bearer_subject(scope: dict[str, Any]) -> str | None:
    """The task instance id in the request's bearer JWT (``sub``), read WITHOUT verifying it.

    Used only to decide which task the request is about; Airflow verifies the token itself. Two
    Authorization headers, or anything that is not a JWT with a UUID subject, yield None: a parser
    difference between this check and Airflow's must never let a request past.
    """
    values = [value for name, value in scope.get("headers") or () if name.lower() == b"authorization"]
    if len(values) != 1 or len(values[0]) > _MAX_TOKEN_CHARS:
        return None
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return str(uuid.UUID(claims["sub"]))
    except (ValueError, TypeError, KeyError, binascii.Error, AttributeError):
        return None


def _execution_path(scope: dict[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    # Starlette's Mount keeps the full path and moves the mount point into root_path.
    return path[len(root) :] if root and path.startswith(root) else path


class RequireAgentCertificate:
    """Pure ASGI middleware in front of the Execution API: an active agent's certificate, and a
    task token for a task instance that agent holds (except ``/health``)."""

    def __init__(self, app: Any, state: "GatewayState") -> None:
        self.app = app
        self.state = state
        self._bound: dict[tuple[str, str], float] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        try:
            if scope["type"] != "http":
                raise AuthFailure(403, "only HTTP requests are served here")
            agent = await authenticate(scope, self.state)
            path = _execution_path(scope)
            if not (path == "/health" or path.startswith("/health/")):
                await self._require_binding(agent.id, bearer_subject(scope))
        except AuthFailure as exc:
            await _reply_json(send, exc.status, {"detail": exc.detail}, websocket=scope["type"] == "websocket")
            return
        await self.app(scope, receive, send)

    async def _require_binding(self, agent_id: str, ti_id: str | None) -> None:
        if ti_id is None:
            raise AuthFailure(403, NOT_LEASED)
        now = time.monotonic()
        key = (agent_id, ti_id)
        if self._bound.get(key, 0.0) > now:
            return
        if not await db(store.agent_holds_ti, agent_id, ti_id):
            self._bound.pop(key, None)
            raise AuthFailure(403, NOT_LEASED)
        if len(self._bound) >= _BINDING_CACHE_MAX:
            self._bound = {k: until for k, until in self._bound.items() if until > now}
        self._bound[key] = now + BINDING_CACHE_SECONDS


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


__all__ = [
    "BINDING_CACHE_SECONDS",
    "NOT_LEASED",
    "AuthFailure",
    "RequireAgentCertificate",
    "authenticate",
    "bearer_subject",
    "current_agent",
    "peer_agent_id",
]
