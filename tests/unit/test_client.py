"""AgentAPI against a fake gateway behind httpx.MockTransport: models in and out, status -> error mapping."""

from __future__ import annotations

import json
import ssl
from datetime import datetime, timedelta, timezone
from typing import Callable

import httpx
import pytest

from edge_agent import protocol as p
from edge_agent.client import AgentAPI
from edge_agent.errors import (
    GatewayUnreachable,
    IdentityRejected,
    LogGap,
    RegistrationRefused,
    RequestRejected,
    ServerCertInvalid,
    ServerError,
    StaleLease,
)

Handler = Callable[[httpx.Request], httpx.Response]


def api_for(handler: Handler) -> AgentAPI:
    return AgentAPI(httpx.Client(base_url="https://gw.test:8443", transport=httpx.MockTransport(handler)))


def reply(status: int, body: object = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status)

    return handler


def lease_json() -> dict:
    return {
        "job_id": "j1", "fencing": 3, "queue": "default", "dag_id": "d", "task_id": "t", "run_id": "r",
        "map_index": -1, "try_number": 1, "workload": {"token": "x"},
        "lease_expires_at": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat(),
    }


def test_each_endpoint_sends_its_model_and_parses_the_reply() -> None:
    seen: list[tuple[str, str, dict | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        path = request.url.path
        if path == p.WHOAMI_PATH:
            return httpx.Response(200, json={"agent_id": "ag_1", "name": "n", "queues": ["q"], "region": "eu",
                                             "state": "active"})
        if path == p.LEASE_PATH:
            return httpx.Response(200, json={"lease": lease_json()})
        if path == p.HEARTBEAT_PATH:
            return httpx.Response(200, json={"drain": True, "lost": ["j9"]})
        if path == p.TRUST_BUNDLE_PATH:
            return httpx.Response(200, json={"ca_pems": ["PEM"], "trust_domain": "td"})
        return httpx.Response(204)

    api = api_for(handler)
    assert api.whoami().agent_id == "ag_1"
    lease = api.lease(free_slots=2, wait_seconds=12.5)
    assert lease is not None and lease.job_id == "j1" and lease.fencing == 3
    api.report_state("j1", p.JobReport(fencing=3, state=p.JobState.RUNNING))
    api.push_logs("j1", p.LogChunk(fencing=3, offset=10, data="line\n"))
    hb = api.heartbeat(p.HeartbeatRequest(free_slots=1, total_slots=2, version="0.1.0",
                                          running=[p.RunningJob(job_id="j1", fencing=3)]))
    assert hb.drain and hb.lost == ["j9"]
    assert api.trust_bundle().ca_pems == ["PEM"]
    assert seen[1] == ("POST", p.LEASE_PATH, {"free_slots": 2, "wait_seconds": 12.5})
    assert seen[2][1] == "/agents/v1/jobs/j1/state" and seen[2][2]["state"] == "running"
    assert seen[3][1] == "/agents/v1/jobs/j1/logs" and seen[3][2]["offset"] == 10
    assert seen[4][2]["running"] == [{"job_id": "j1", "fencing": 3}]


def test_lease_null_and_long_poll_read_timeout() -> None:
    timeouts = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return httpx.Response(200, json={"lease": None})

    api = api_for(handler)
    assert api.lease(free_slots=1, wait_seconds=30) is None
    assert timeouts[0]["read"] == 30 + 15.0  # the poll must not time out before the gateway answers
    api.lease(free_slots=1, wait_seconds=500)  # clamped to the protocol's maximum
    assert timeouts[1]["read"] == p.MAX_LEASE_WAIT_SECONDS + 15.0


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (401, IdentityRejected, False),
        (403, IdentityRejected, False),
        (500, ServerError, True),
        (503, ServerError, True),
        (429, ServerError, True),
        (400, RequestRejected, False),
        (422, RequestRejected, False),
        (404, RequestRejected, False),  # not a job route: a wrong URL prefix, say
    ],
)
def test_status_codes_map_to_errors(status: int, error: type, retryable: bool) -> None:
    api = api_for(reply(status, {"detail": "because"}))
    with pytest.raises(error) as info:
        api.whoami()
    assert info.value.retryable is retryable
    assert "because" in str(info.value)


def test_403_means_revoked() -> None:
    with pytest.raises(IdentityRejected) as info:
        api_for(reply(403, {"detail": "agent ag_1 is revoked"})).heartbeat(
            p.HeartbeatRequest(free_slots=1, total_slots=1, version="x"))
    assert info.value.revoked
    assert "revoked" in str(info.value)


def test_a_403_about_a_job_is_not_a_revocation() -> None:
    # The gateway refuses log chunks of a queue whose logs stay local with 403: that must not stop the agent.
    chunk = p.LogChunk(fencing=1, offset=0, data="x\n")
    with pytest.raises(RequestRejected, match="keeps task logs in the agent's region"):
        api_for(reply(403, {"detail": "this job's queue policy keeps task logs in the agent's region"})).push_logs(
            "j1", chunk)
    with pytest.raises(IdentityRejected) as info:
        api_for(reply(403, {"detail": "agent ag_1 is revoked"})).push_logs("j1", chunk)
    assert info.value.revoked


def test_unregister_route() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(204)

    api_for(handler).unregister()
    assert seen == [("DELETE", p.SELF_PATH)]


@pytest.mark.parametrize("status", [404, 409])
def test_job_routes_map_404_and_409_to_stale_lease(status: int) -> None:
    api = api_for(reply(status, {"detail": "stale fencing id"}))
    with pytest.raises(StaleLease):
        api.report_state("j1", p.JobReport(fencing=1, state=p.JobState.SUCCESS, exit_code=0))
    with pytest.raises(StaleLease):
        api.push_logs("j1", p.LogChunk(fencing=1, offset=0, data="x"))


def test_log_gap_tells_where_the_gateway_copy_ends() -> None:
    api = api_for(reply(409, {"detail": "log chunk starts at byte 500 but the log has 120 bytes"}))
    with pytest.raises(LogGap) as info:
        api.push_logs("j1", p.LogChunk(fencing=1, offset=500, data="x"))
    assert info.value.size == 120 and info.value.retryable


def test_register_401_is_a_refused_registration() -> None:
    api = api_for(reply(401, {"detail": "token expired"}))
    with pytest.raises(RegistrationRefused, match="token expired"):
        api.register(p.RegisterRequest(token="t", csr_pem="c", version="v"))


def test_unreadable_reply_is_a_server_error() -> None:
    api = api_for(lambda r: httpx.Response(200, text="<html>proxy login</html>"))
    with pytest.raises(ServerError, match="cannot read"):
        api.whoami()
    api = api_for(reply(200, {"unexpected": 1}))
    with pytest.raises(ServerError):
        api.whoami()


def test_non_json_error_body_still_gives_a_message() -> None:
    api = api_for(lambda r: httpx.Response(502, text="Bad Gateway from nginx"))
    with pytest.raises(ServerError, match="Bad Gateway from nginx"):
        api.whoami()


def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "match"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "cannot reach https://gw.test:8443"),
        (httpx.ReadTimeout("timed out"), "did not answer in time"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."),
         "refusing this agent's certificate"),
        (httpx.ProxyError("407 Proxy Authentication Required"), "proxy"),
        (httpx.ReadError("connection reset"), "failed"),
    ],
)
def test_transport_errors_are_gateway_unreachable(exc: Exception, match: str) -> None:
    with pytest.raises(GatewayUnreachable, match=match) as info:
        api_for(raising(exc)).whoami()
    assert info.value.retryable


def test_certificate_verification_failure_is_not_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
        cause.verify_message = "unable to get local issuer certificate"
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]") from cause

    with pytest.raises(ServerCertInvalid, match="unable to get local issuer certificate") as info:
        api_for(handler).whoami()
    assert not info.value.retryable


def test_execution_request_passes_statuses_through_and_filters_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(409, json={"detail": "already running"},
                              headers={"refreshed-api-token": "new", "connection": "close"})

    api = api_for(handler)
    status, headers, body = api.execution_request(
        "PATCH", "/execution/task-instances/x/run?y=1",
        {"Authorization": "Bearer t", "Host": "evil", "Content-Length": "2", "content-type": "application/json"},
        b"{}",
    )
    assert status == 409 and json.loads(body) == {"detail": "already running"}
    assert headers["refreshed-api-token"] == "new" and "connection" not in {k.lower() for k in headers}
    req = seen[0]
    assert req.url.path == "/execution/task-instances/x/run" and req.url.query == b"y=1"
    assert req.headers["authorization"] == "Bearer t" and req.headers["host"] == "gw.test:8443"
    assert req.content == b"{}"


@pytest.mark.parametrize(
    "path", ["/agents/v1/lease", "/execution/../agents/v1/lease", "/execution/%2e%2e/agents/v1/lease", "execution/x"]
)
def test_execution_request_refuses_other_paths(path: str) -> None:
    with pytest.raises(RequestRejected):
        api_for(reply(200, {})).execution_request("GET", path, {}, b"")


def test_execution_request_transport_failure_raises() -> None:
    with pytest.raises(GatewayUnreachable):
        api_for(raising(httpx.ConnectError("refused"))).execution_request("GET", "/execution/health", {}, b"")


# -- certificate_refused: real TLS, a gateway that does not trust our client certificate ----------



def test_certificate_refused_tells_a_rejected_certificate_from_a_dead_network(tmp_path) -> None:
    import threading
    from datetime import datetime, timedelta, timezone
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import trustme

    from edge_agent.client import certificate_refused
    from edge_agent.identity.keystore import StoredIdentity

    server_ca, agent_ca, trusted_client_ca = trustme.CA(), trustme.CA(), trustme.CA()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = json.dumps({"ca_pems": [server_ca.cert_pem.bytes().decode()], "trust_domain": "t"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # like the gateway: no certificate is fine, a foreign one is not
    trusted_client_ca.configure_trust(ctx)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    thread.start()
    try:
        leaf = agent_ca.issue_cert("agent.test")
        identity = StoredIdentity(
            agent_id="ag_1", name="n", queues=(), region="r", url=f"https://127.0.0.1:{server.server_address[1]}",
            executor="x", cert_not_after=datetime.now(timezone.utc) + timedelta(hours=1),
            cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(server_ca.cert_pem.bytes().decode(),),
            key_pem=leaf.private_key_pem.bytes(),
        )
        from edge_agent.transport import build_client

        api = AgentAPI(build_client(identity.url, identity, 10))
        # The server's alert reaches us here (ssl's test server sends it); uvicorn just drops the connection.
        with pytest.raises(IdentityRejected, match="TLSV1_ALERT_UNKNOWN_CA"):
            api.whoami()
        api.close()
        assert certificate_refused(identity, timeout=10) is True
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert certificate_refused(identity, timeout=10) is False  # nothing listens now: plain unreachable


def test_execution_request_relays_names_with_dots_and_refuses_traversal() -> None:
    import httpx
    import pytest

    from edge_agent.client import AgentAPI
    from edge_agent.errors import RequestRejected

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"ok": True})

    api = AgentAPI(httpx.Client(base_url="https://gw.test", transport=httpx.MockTransport(handler)))
    status, _, _ = api.execution_request("GET", "/execution/variables/a..b", {}, b"")
    assert status == 200 and seen == ["/execution/variables/a..b"]
    with pytest.raises(RequestRejected):
        api.execution_request("GET", "/execution/../agents/v1/lease", {}, b"")
    assert len(seen) == 1
