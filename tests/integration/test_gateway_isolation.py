"""Compliance isolation through the real gateway: queue policies decided at lease time (also for
agents registered before the policy), the log policy in the lease and at the logs route, and
refusals by an agent's local policy."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from edge_agent.protocol import LEASE_PATH, LeaseResponse, RegistrationToken, job_logs_path, job_state_path
from executor_plugin import store
from executor_plugin.models import JobStatus, job_refusal_table, job_table


def mint(gateway, queues: list[str], region: str) -> RegistrationToken:
    token = RegistrationToken.mint(gateway.ca.pin)
    with gateway.home.session() as s:
        store.create_token(
            s, token_id=token.token_id, secret_hash=store.hash_secret(token.secret), queues=queues, region=region,
            name=None, ttl=timedelta(hours=1), max_uses=1,
        )
        s.commit()
    return token


def set_policy(gateway, queue: str, **kwargs) -> None:
    with gateway.home.session() as s:
        store.set_queue_policy(s, queue, **kwargs)
        s.commit()


def poll(gateway, agent, wait: float = 0.5):
    with gateway.client(agent) as c:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": wait})
    assert r.status_code == 200, r.text
    return LeaseResponse.model_validate(r.json()).lease


def job_row(gateway, job_id: str):
    with gateway.home.session() as s:
        return s.execute(select(job_table).where(job_table.c.id == job_id)).one()


def test_policy_excludes_a_region_even_for_agents_registered_before_it(gateway, tmp_path):
    queue = gateway.new_queue()
    us = gateway.register(tmp_path, token=mint(gateway, [queue], "us-east-1"))
    eu = gateway.register(tmp_path, token=mint(gateway, [queue], "eu-west-1"))
    assert us.identity.region == "us-east-1"
    set_policy(gateway, queue, regions=["eu-*"])  # after both registered
    job_id = gateway.enqueue(queue)
    assert poll(gateway, us, wait=1.0) is None
    assert job_row(gateway, job_id).state == JobStatus.QUEUED
    lease = poll(gateway, eu)
    assert lease is not None and lease.job_id == job_id
    # Widening the policy again lets the us agent in at once.
    set_policy(gateway, queue, regions=["*"])
    other = gateway.enqueue(queue)
    lease = poll(gateway, us)
    assert lease is not None and lease.job_id == other


def test_lease_carries_the_log_policy_and_local_logs_are_refused(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = gateway.register(tmp_path, queues=[queue])
    log_path = f"dag_id=d/run_id=r/task_id={queue}/attempt=1.log"
    hosted_id = gateway.enqueue(queue, task_id="hosted")
    hosted = poll(gateway, agent)
    assert hosted.job_id == hosted_id and hosted.log_policy.value == "hosted"

    set_policy(gateway, queue, logs="local")
    job_id = gateway.enqueue(queue, task_id=queue, log_path=log_path)
    lease = poll(gateway, agent)
    assert lease.job_id == job_id and lease.log_policy.value == "local"
    with gateway.client(agent) as c:
        r = c.post(job_logs_path(job_id), json={"fencing": lease.fencing, "offset": 0, "data": "secret row\n"})
    assert r.status_code == 403 and "region" in r.json()["detail"]
    assert not (gateway.home.log_folder / log_path).exists()


def test_a_refused_job_goes_to_another_agent_and_never_back(gateway, tmp_path):
    queue = gateway.new_queue()
    token = gateway.mint_token(queues=[queue], max_uses=2)
    refuser = gateway.register(tmp_path, token=token)
    other = gateway.register(tmp_path, token=token)
    job_id = gateway.enqueue(queue)
    lease = poll(gateway, refuser)
    assert lease.job_id == job_id
    body = {"fencing": lease.fencing, "state": "refused", "reason": "dag 'd' is not in the allowed DAG ids"}
    with gateway.client(refuser) as c:
        first = c.post(job_state_path(job_id), json=body)
        repeat = c.post(job_state_path(job_id), json=body)  # its response was lost
    assert first.status_code == 204 and repeat.status_code == 204
    row = job_row(gateway, job_id)
    assert (row.state, row.agent_id, row.fencing) == (JobStatus.QUEUED, None, lease.fencing + 1)

    assert poll(gateway, refuser, wait=1.0) is None
    again = poll(gateway, other)
    assert again is not None and again.job_id == job_id and again.fencing > lease.fencing + 1
    with gateway.home.session() as s:
        [refusal] = s.execute(select(job_refusal_table).where(job_refusal_table.c.job_id == job_id)).all()
    assert (refusal.agent_id, refusal.reason) == (refuser.agent_id, body["reason"])


def test_a_refusal_nobody_else_can_take_fails_the_job_with_the_reason(gateway, tmp_path):
    queue = gateway.new_queue()
    only = gateway.register(tmp_path, queues=[queue])
    job_id = gateway.enqueue(queue)
    lease = poll(gateway, only)
    with gateway.client(only) as c:
        r = c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "refused", "reason": "bundle x"})
    assert r.status_code == 204
    row = job_row(gateway, job_id)
    assert row.state == JobStatus.FAILED
    assert row.reason.startswith(f"refused by agent {only.agent_id}: bundle x")
