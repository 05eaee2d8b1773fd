"""Attacks on the gateway's front door: calling without a certificate, with one from another CA,
with an expired one, and as a revoked agent.

Each test asserts the refusal and that nothing moved: the jobs the caller aimed at keep their rows
(no lease handed out, no state recorded), the agent row keeps its heartbeat, no log byte is written,
and Airflow's task instance row is untouched when the call was for the Execution API.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from secsupport import (
    add_queued_task_instance,
    agent_cert_signed_by,
    agent_count,
    agent_row,
    client_with,
    enqueue_for,
    enroll,
    expired_agent_cert,
    job_row,
    lease_job,
    log_tree,
    run_payload,
    task_instance_row,
    token_row,
    write_identity,
)
from sqlalchemy import update

from edge_agent.identity.pki_utils import generate_key, make_csr
from edge_agent.protocol import (
    HEARTBEAT_PATH,
    LEASE_PATH,
    RENEW_PATH,
    SELF_PATH,
    TRUST_BUNDLE_PATH,
    WHOAMI_PATH,
    job_logs_path,
    job_state_path,
)
from executor_plugin.models import AgentStatus, agent_table


class Target:
    """An agent holding one leased job (of a real Airflow task instance), with a second job queued
    on its queue: everything an attacker would like to lease, report on, log to or start."""

    def __init__(self, gw: Any, tmp_path: Any) -> None:
        self.gw = gw
        queue = gw.new_queue()
        self.agent = enroll(gw, tmp_path, queues=[queue])
        self.ti = add_queued_task_instance(gw, queue=queue)
        self.held_job = enqueue_for(gw, self.ti, queue)
        self.lease = lease_job(gw, self.agent, self.held_job)
        self.queued_job = gw.enqueue(queue)
        self.token_id = agent_row(gw, self.agent.agent_id)["token_id"]

    def requests(self) -> dict[str, tuple[str, str, dict[str, Any] | None, dict[str, str]]]:
        """Every authenticated route, each with a body that would succeed for the real agent."""
        job, fencing = self.lease.job_id, self.lease.fencing
        bearer = {"authorization": f"Bearer {self.lease.workload['token']}"}
        return {
            "whoami": ("GET", WHOAMI_PATH, None, {}),
            "lease": ("POST", LEASE_PATH, {"free_slots": 1, "wait_seconds": 0}, {}),
            "state": ("POST", job_state_path(job), {"fencing": fencing, "state": "running"}, {}),
            "logs": ("POST", job_logs_path(job), {"fencing": fencing, "offset": 0, "data": "forged line\n"}, {}),
            "heartbeat": (
                "POST", HEARTBEAT_PATH,
                {"free_slots": 1, "total_slots": 1, "version": "x", "running": [{"job_id": job, "fencing": fencing}]},
                {},
            ),
            "renew": ("POST", RENEW_PATH, {"csr_pem": make_csr(generate_key(), "x")}, {}),
            "self": ("DELETE", SELF_PATH, None, {}),
            "execution_run": ("PATCH", f"/execution/task-instances/{self.ti.id}/run", run_payload(), bearer),
            "execution_health": ("GET", "/execution/health", None, {}),
        }

    def snapshot(self) -> dict[str, Any]:
        gw = self.gw
        return {
            "held_job": job_row(gw, self.held_job),
            "queued_job": job_row(gw, self.queued_job),
            "agent": agent_row(gw, self.agent.agent_id),
            "token": token_row(gw, self.token_id),
            "agents": agent_count(gw),
            "logs": log_tree(gw),
            "task_instance": task_instance_row(gw, self.ti.id),
        }


@pytest.fixture
def target(gateway, tmp_path) -> Target:
    return Target(gateway, tmp_path)


def _send(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> httpx.Response:
    return client.request(method, path, json=body, headers=headers)


ROUTES = ["whoami", "lease", "state", "logs", "heartbeat", "renew", "self", "execution_run", "execution_health"]


@pytest.mark.parametrize("route", ROUTES)
def test_no_client_certificate_is_401_and_changes_nothing(gateway, target, route):
    method, path, body, headers = target.requests()[route]
    before = target.snapshot()
    with gateway.client() as anonymous:
        r = _send(anonymous, method, path, body, headers)
    assert r.status_code == 401, (route, r.status_code, r.text)
    assert r.json() == {"detail": "client certificate required"}
    assert target.snapshot() == before


@pytest.mark.parametrize(
    "header",
    ["x-forwarded-client-cert", "x-ssl-client-cert", "ssl-client-cert", "x-client-cert", "x-forwarded-for"],
)
def test_certificate_claimed_in_a_header_is_ignored(gateway, target, header):
    # The gateway terminates TLS itself and trusts no proxy: a header carrying a real agent's
    # certificate (as a TLS-terminating proxy would add) authenticates nobody.
    value = target.agent.identity.cert_pem.replace("\n", "") if header != "x-forwarded-for" else "127.0.0.1"
    before = target.snapshot()
    with gateway.client() as anonymous:
        for route in ("whoami", "lease", "execution_run"):
            method, path, body, headers = target.requests()[route]
            r = _send(anonymous, method, path, body, {**headers, header: value})
            assert r.status_code == 401, (route, r.status_code, r.text)
    assert target.snapshot() == before


def _handshake_refused(gw: Any, cert_file: Any, key_file: Any, target: Target) -> None:
    for route in ("whoami", "lease", "heartbeat", "logs", "execution_run"):
        method, path, body, headers = target.requests()[route]
        with client_with(gw, cert_file, key_file) as c, pytest.raises(httpx.TransportError):
            # TLS 1.3 reports the server's rejection after the client finished its side of the
            # handshake: it surfaces as a read or protocol error rather than an ssl error.
            _send(c, method, path, body, headers)


def test_certificate_from_another_ca_fails_the_handshake(gateway, target, tmp_path):
    # The forger copies our CA's subject name and claims the real agent's SPIFFE id: only the
    # signature can tell, and the TLS layer checks it against our CA bundle.
    forger = generate_key()
    key = generate_key()
    now = datetime.now(timezone.utc)
    pem = agent_cert_signed_by(
        forger, gateway.ca.cert.subject, key, agent_id=target.agent.agent_id, trust_domain=gateway.trust_domain,
        not_before=now - timedelta(hours=1), not_after=now + timedelta(hours=1),
    )
    cert_file, key_file = write_identity(tmp_path / "forged", key, pem)
    before = target.snapshot()
    _handshake_refused(gateway, cert_file, key_file, target)
    assert target.snapshot() == before


def test_expired_certificate_fails_the_handshake(gateway, target, tmp_path):
    # Issued by our own CA, for the real agent, with the agent's own key: only the date is wrong.
    pem = expired_agent_cert(
        gateway.ca, target.agent.key, agent_id=target.agent.agent_id, trust_domain=gateway.trust_domain
    )
    cert_file, key_file = write_identity(tmp_path / "expired", target.agent.key, pem)
    before = target.snapshot()
    _handshake_refused(gateway, cert_file, key_file, target)
    assert target.snapshot() == before


def _revoke_in_db(gw: Any, agent_id: str) -> None:
    with gw.home.session() as s:
        s.execute(update(agent_table).where(agent_table.c.id == agent_id).values(state=AgentStatus.REVOKED))
        s.commit()


@pytest.mark.parametrize("route", ROUTES)
def test_revoked_agent_is_403_and_changes_nothing(gateway, target, route):
    _revoke_in_db(gateway, target.agent.agent_id)
    method, path, body, headers = target.requests()[route]
    before = target.snapshot()
    with gateway.client(target.agent) as c:
        r = _send(c, method, path, body, headers)
    assert r.status_code == 403, (route, r.status_code, r.text)
    assert "revoked" in r.json()["detail"]
    assert target.snapshot() == before


def test_trust_bundle_stays_open_and_says_nothing_secret(gateway):
    # The one route besides register that needs no certificate: it must only carry public CA certs.
    with gateway.client() as c:
        r = c.get(TRUST_BUNDLE_PATH)
    assert r.status_code == 200
    body = r.text
    assert "PRIVATE KEY" not in body
    assert set(r.json()) == {"ca_pems", "trust_domain"}
