"""``AgentAPI``: one method per gateway endpoint, returning protocol models; maps every failure to an error.

No retries and no sleeping here: loops decide how hard to try (``backoff.py``). Status mapping:

=========================  ======================================================
401                        IdentityRejected (unknown agent or no certificate); RegistrationRefused on register
403                        IdentityRejected(revoked=True); on a job route a 403 that is not about a
                           revocation is a RequestRejected (e.g. logs of a queue that keeps them local)
404 / 409 on a job route   StaleLease (the job is not ours any more); LogGap for a 409 on a log chunk
                           that starts past the end of the gateway's copy
408, 429, 5xx              ServerError (retryable)
other 4xx                  RequestRejected
connect/read/timeout       GatewayUnreachable (retryable)
=========================  ======================================================

Under TLS 1.3 a client certificate the gateway refuses (expired, from a CA it no longer trusts) does
not fail the handshake on our side: the server's alert arrives after it. When the alert reaches us
(``ReadError: ... ALERT_UNKNOWN_CA``) it is an IdentityRejected; when the server just drops the
connection (uvicorn: ``RemoteProtocolError: Server disconnected``) it is a GatewayUnreachable with a
hint, and :func:`certificate_refused` tells the two cases apart for ``edge-agent status``.

Certificate rotation swaps the underlying client (:meth:`AgentAPI.replace_client`): new requests
use the new certificate at once, requests already in flight (a lease long-poll, a task's Execution
API call relayed by the forwarder) finish on the old client, which is closed when its last one ends.
"""

from __future__ import annotations

import json
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

from edge_agent import protocol as p
from edge_agent.errors import (
    EdgeAgentError,
    GatewayUnreachable,
    IdentityRejected,
    LogGap,
    RegistrationRefused,
    RequestRejected,
    ServerCertInvalid,
    ServerError,
    StaleLease,
)

if TYPE_CHECKING:
    import httpx

    from edge_agent.identity.keystore import StoredIdentity

M = TypeVar("M", bound=BaseModel)

#: The gateway's 409 for a log chunk that starts past the end of its copy (jobs.py, ``LogGap``).
_LOG_GAP = re.compile(r"log chunk starts at byte \d+ but the log has (\d+) bytes")

#: TLS alerts a server sends about the certificate the client presented.
_CLIENT_CERT_ALERTS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})

#: Extra read time on top of the long-poll wait before we call the gateway unreachable.
LEASE_READ_MARGIN = 15.0

# Hop-by-hop headers, and the ones httpx recomputes (it decodes content, so the upstream
# content-encoding/length no longer describe the body we hand back).
_DROP_REQUEST_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                                   "te", "upgrade", "proxy-authorization", "proxy-connection"})
_DROP_RESPONSE_HEADERS = frozenset({"content-length", "content-encoding", "connection", "keep-alive",
                                    "transfer-encoding", "te", "upgrade"})


class AgentAPI:
    """The gateway's agent API over one long-lived ``httpx.Client`` (see ``transport.build_client``)."""

    def __init__(self, client: "httpx.Client") -> None:
        self._client = client
        self._lock = threading.Lock()
        #: Requests in flight per client (by id), and clients replaced but still in use.
        self._inflight: dict[int, int] = {}
        self._retired: dict[int, "httpx.Client"] = {}

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    def replace_client(self, client: "httpx.Client") -> None:
        """Send new requests through ``client``; close the old one once its in-flight requests end."""
        with self._lock:
            old, self._client = self._client, client
            busy = self._inflight.get(id(old), 0) > 0
            if busy:
                self._retired[id(old)] = old
        if not busy:
            old.close()

    def close(self) -> None:
        with self._lock:
            clients = [self._client, *self._retired.values()]
            self._retired.clear()
        for client in clients:
            client.close()

    # -- endpoints ------------------------------------------------------------------------------

    def trust_bundle(self) -> p.TrustBundle:
        return self._call("GET", p.TRUST_BUNDLE_PATH, reply=p.TrustBundle)

    def register(self, request: p.RegisterRequest) -> p.AgentIdentity:
        return self._call("POST", p.REGISTER_PATH, body=request, reply=p.AgentIdentity,
                          on_unauthorized=RegistrationRefused)

    def whoami(self) -> p.WhoAmI:
        return self._call("GET", p.WHOAMI_PATH, reply=p.WhoAmI)

    def lease(self, free_slots: int, wait_seconds: float) -> p.Lease | None:
        """Long-poll for one job; returns None when the wait ends without work."""
        wait = max(0.0, min(wait_seconds, p.MAX_LEASE_WAIT_SECONDS))
        reply = self._call("POST", p.LEASE_PATH, body=p.LeaseRequest(free_slots=free_slots, wait_seconds=wait),
                           reply=p.LeaseResponse, read_timeout=wait + LEASE_READ_MARGIN)
        return reply.lease

    def report_state(self, job_id: str, report: p.JobReport) -> None:
        self._call("POST", p.job_state_path(job_id), body=report, job_route=True)

    def push_logs(self, job_id: str, chunk: p.LogChunk) -> None:
        self._call("POST", p.job_logs_path(job_id), body=chunk, job_route=True)

    def heartbeat(self, request: p.HeartbeatRequest) -> p.HeartbeatResponse:
        return self._call("POST", p.HEARTBEAT_PATH, body=request, reply=p.HeartbeatResponse)

    def renew(self, request: p.RenewRequest) -> p.AgentIdentity:
        """A new certificate for a new key, asked for under the current (still valid) certificate."""
        return self._call("POST", p.RENEW_PATH, body=request, reply=p.AgentIdentity)

    def unregister(self) -> None:
        """Remove this agent on the server (its open jobs go back to the queue)."""
        self._call("DELETE", p.SELF_PATH)

    def execution_request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Relay one Execution API call for a task supervisor (used by the forwarder).

        Status codes pass through untouched (they belong to Airflow's API); only transport failures
        raise (GatewayUnreachable / ServerCertInvalid).
        """
        refusal = p.execution_target_refusal(path)
        if refusal is not None:
            # Defence in depth: the forwarder filters too, but this client carries our certificate
            # and must never be pointed at the agent API on a task's behalf.
            raise RequestRejected(f"refusing to relay {path!r}: {refusal}")
        fwd = {k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        resp = self._send(method, path, content=body, headers=fwd)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        return resp.status_code, out, resp.content

    # -- the one request builder ----------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        reply: type[M] | None = None,
        job_route: bool = False,
        read_timeout: float | None = None,
        on_unauthorized: Callable[[str], EdgeAgentError] | None = None,
    ) -> Any:
        content = body.model_dump_json().encode() if body is not None else None
        headers = {"content-type": "application/json"} if content is not None else {}
        resp = self._send(method, path, content=content, headers=headers, read_timeout=read_timeout)
        code = resp.status_code
        if 200 <= code < 300:
            if reply is None:
                return None
            try:
                return reply.model_validate_json(resp.content)
            except ValidationError as exc:
                raise ServerError(
                    f"{method} {path}: the gateway sent a reply this agent cannot read "
                    f"(version skew, or a proxy answered): {exc.errors()[0].get('msg', exc)}"
                ) from None
        detail = _detail(resp)
        what = f"{method} {path}"
        if code == 401:
            if on_unauthorized is not None:
                raise on_unauthorized(f"registration refused: {detail}")
            raise IdentityRejected(f"the gateway does not accept this agent ({detail}): re-register")
        if code == 403 and job_route and "revoked" not in detail:
            # A refusal about this job, not about us (a queue whose logs must stay in the region refuses
            # log chunks with 403): taking it for a revocation would stop the agent and cancel every task.
            raise RequestRejected(f"{what}: gateway refused the request (403): {detail}")
        if code == 403:
            raise IdentityRejected(f"this agent was revoked ({detail}): re-register with a new token", revoked=True)
        if job_route and code == 409 and (gap := _LOG_GAP.search(detail)):
            raise LogGap(f"{what}: {detail}", size=int(gap.group(1)))
        if job_route and code in (404, 409):
            raise StaleLease(f"{what}: {detail}")
        if code in (408, 429) or code >= 500:
            raise ServerError(f"{what}: gateway answered {code}: {detail}")
        raise RequestRejected(f"{what}: gateway refused the request ({code}): {detail}")

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None,
        headers: Mapping[str, str],
        read_timeout: float | None = None,
    ) -> "httpx.Response":
        import httpx

        with self._lock:
            client = self._client
            self._inflight[id(client)] = self._inflight.get(id(client), 0) + 1
        kwargs: dict[str, Any] = {}
        if read_timeout is not None:
            t = client.timeout
            kwargs["timeout"] = httpx.Timeout(connect=t.connect, read=read_timeout, write=t.write, pool=t.pool)
        try:
            return client.request(method, path, content=content, headers=dict(headers), **kwargs)
        except httpx.TransportError as exc:
            raise translate_transport_error(exc, self.base_url) from None
        finally:
            self._release(client)

    def _release(self, client: "httpx.Client") -> None:
        with self._lock:
            left = self._inflight[id(client)] - 1
            if left:
                self._inflight[id(client)] = left
                return
            del self._inflight[id(client)]
            retired = self._retired.pop(id(client), None)
        if retired is not None:
            retired.close()  # its last request ended after a rotation replaced it


def translate_transport_error(exc: Exception, url: str) -> EdgeAgentError:
    """Classify an httpx transport failure once (used by AgentAPI and the register flow)."""
    import ssl

    import httpx

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ServerCertInvalid(
                f"the TLS certificate of {url} does not verify against this agent's CA "
                f"({cause.verify_message or cause.reason}); check the URL (host name) or for a TLS-inspecting proxy"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason in _CLIENT_CERT_ALERTS:
            return IdentityRejected(
                f"{url} refused this agent's certificate during the TLS handshake ({cause.reason}): it expired "
                "or was issued by a CA the gateway no longer trusts; re-register with a new token"
            )
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ProxyError):
        return GatewayUnreachable(f"the HTTPS proxy refused the connection to {url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return GatewayUnreachable(f"{url} did not answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return GatewayUnreachable(f"cannot reach {url}: {exc or 'connection failed'}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return GatewayUnreachable(
            f"{url} closed the connection ({exc}); if this persists the gateway may be refusing this "
            "agent's certificate: see 'edge-agent status'"
        )
    return GatewayUnreachable(f"connection to {url} failed: {type(exc).__name__}: {exc}")


def certificate_refused(identity: "StoredIdentity", timeout: float = 10.0) -> bool:
    """True if the gateway answers without a client certificate but refuses ours.

    Tells "the gateway refuses our certificate at the TLS layer" from "the network is down", which
    under TLS 1.3 can look the same to the client.
    """
    from edge_agent.transport import build_bootstrap_client, build_client

    bare = AgentAPI(build_bootstrap_client(identity.url, identity.ca_pems, timeout))
    try:
        bare.trust_bundle()
    except GatewayUnreachable:
        return False  # not even an anonymous call gets through: a network problem
    except EdgeAgentError:
        pass  # it answered: reachable
    finally:
        bare.close()
    mine = AgentAPI(build_client(identity.url, identity, timeout))
    try:
        mine.trust_bundle()
    except (IdentityRejected, GatewayUnreachable):
        return True
    except EdgeAgentError:
        return False
    finally:
        mine.close()
    return False


def _detail(resp: "httpx.Response") -> str:
    try:
        data = json.loads(resp.content)
        detail = data.get("detail") if isinstance(data, dict) else None
        if isinstance(detail, str):
            return detail[:300]
        if detail is not None:
            return json.dumps(detail)[:300]
    except ValueError:
        pass
    text = resp.content[:200].decode("utf-8", "replace").strip()
    return text or resp.reason_phrase or "no detail"


__all__ = ["AgentAPI", "certificate_refused", "translate_transport_error"]
