"""The Execution API behind the gateway accepts a task's calls only from the agent holding that
task instance's lease; anything else is refused before Airflow sees it.

Without Airflow's tables in this home, a request that reaches Airflow's Execution API is told so
by Airflow's own answer (its token checks: "Token type 'workload' not allowed ...", "Invalid auth
token"); a request stopped by the gateway gets the gateway's own detail. That difference is what
these tests read to tell "Airflow saw it" from "Airflow never saw it"."""

from __future__ import annotations

import base64
import json
import time

from edge_agent.protocol import LEASE_PATH, Lease, LeaseResponse, job_state_path
from executor_plugin.gateway.auth import BINDING_CACHE_SECONDS, NOT_LEASED

VARIABLE = "/execution/variables/some_key"


def lease_now(gateway, agent) -> Lease:
    with gateway.client(agent) as c:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 10})
    lease = LeaseResponse.model_validate(r.json()).lease
    assert lease is not None
    return lease


def call(gateway, agent, token: str | None, path: str = VARIABLE):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with gateway.client(agent) as c:
        return c.get(path, headers=headers)


def forged(sub: str) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS512', 'typ': 'JWT'})}.{part({'sub': sub, 'scope': 'execution'})}.c2lnbmF0dXJl"


def test_a_task_token_works_only_for_the_agent_holding_the_lease(gateway, tmp_path):
    queue = gateway.new_queue()
    token = gateway.mint_token(queues=[queue], max_uses=2)
    holder, thief = gateway.register(tmp_path, token=token), gateway.register(tmp_path, token=token)
    gateway.enqueue(queue)
    lease = lease_now(gateway, holder)
    task_token = lease.workload["token"]

    stolen = call(gateway, thief, task_token)
    assert stolen.status_code == 403 and stolen.json() == {"detail": NOT_LEASED}
    own = call(gateway, holder, task_token)
    # Airflow answered (it refuses a workload-scope token on this route): the gateway let it through.
    assert own.status_code == 403 and "Token type 'workload'" in own.json()["detail"], own.text


def test_no_or_malformed_token_is_refused_and_health_needs_only_a_certificate(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    for token in (None, "not-a-jwt", forged("not-a-uuid")):
        r = call(gateway, agent, token)
        assert r.status_code == 403 and r.json() == {"detail": NOT_LEASED}, token
    assert call(gateway, agent, None, "/execution/health").status_code == 200
    with gateway.client() as c:  # no certificate at all
        assert c.get("/execution/health").status_code == 401


def test_the_subject_only_selects_the_task_and_airflow_still_checks_the_signature(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    gateway.enqueue(agent.identity.queues[0])
    lease = lease_now(gateway, agent)
    r = call(gateway, agent, forged(lease.workload["ti"]["id"]))
    assert r.status_code == 403 and r.json()["detail"] == "Invalid auth token"  # Airflow's refusal


def test_the_binding_ends_with_the_lease(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = lease_now(gateway, agent)
    task_token = lease.workload["token"]
    assert call(gateway, agent, task_token).json()["detail"] != NOT_LEASED
    with gateway.client(agent) as c:
        done = c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "success", "exit_code": 0})
    assert done.status_code == 204
    # A granted binding is remembered for a few seconds at most.
    deadline = time.monotonic() + BINDING_CACHE_SECONDS + 30
    while call(gateway, agent, task_token).json() != {"detail": NOT_LEASED}:
        assert time.monotonic() < deadline, "the binding outlived the lease"
        time.sleep(0.5)
