"""Isolation attacks by a registered agent: reaching for another queue's job, running outside the
regions a queue allows, acting with a stale or foreign fencing id, shipping logs that must stay in
its region, and getting a job it refused offered again.

Each test asserts the refusal and that the job row (and the log folder) did not change.
"""

from __future__ import annotations

import pytest
from secsupport import HeldPoll, airflow_cli, enroll, job_row, lease, lease_job, log_tree

from edge_agent.protocol import (
    HEARTBEAT_PATH,
    LEASE_PATH,
    LogPolicy,
    job_logs_path,
    job_state_path,
)
from executor_plugin import store
from executor_plugin.models import JobStatus


def _set_policy(gw, queue: str, *, regions: list[str] | None = None, logs: str | None = None) -> None:
    with gw.home.session() as s:
        store.set_queue_policy(s, queue, regions=regions, logs=logs)
        s.commit()


def test_agent_never_leases_another_queues_job(gateway, tmp_path):
    agent = enroll(gateway, tmp_path, queues=[gateway.new_queue()])
    foreign_job = gateway.enqueue(gateway.new_queue())
    before = job_row(gateway, foreign_job)
    with gateway.client(agent) as c:
        # The request body has no say in queues: an invented field is refused outright.
        widened = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 0, "queues": [before["queue"]]})
        got = lease(gateway, agent, wait_seconds=1, client=c)
    assert widened.status_code == 422
    assert got is None
    assert job_row(gateway, foreign_job) == before


def test_region_policy_set_after_registration_keeps_jobs_from_the_agent(gateway, tmp_path):
    queue = gateway.new_queue()
    us_agent = enroll(gateway, tmp_path, queues=[queue], region="us-1")  # registered while no policy existed
    changed = airflow_cli(gateway, "queue", "set", queue, "--regions", "eu-*")
    assert changed.returncode == 0, changed.stderr
    assert us_agent.agent_id in changed.stdout  # the operator is told whom the change excludes
    job_id = gateway.enqueue(queue)
    before = job_row(gateway, job_id)
    assert lease(gateway, us_agent, wait_seconds=1) is None
    assert job_row(gateway, job_id) == before
    # Control: the same job goes to an agent in an allowed region.
    eu_agent = enroll(gateway, tmp_path, queues=[queue], region="eu-west-1")
    assert lease_job(gateway, eu_agent, job_id).queue == queue


def test_region_policy_change_applies_to_a_poll_already_held(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = enroll(gateway, tmp_path, queues=[queue], region="us-1")
    with gateway.client(agent, timeout=120) as c:
        poll = HeldPoll(c, wait_seconds=4)
        assert poll.sent.wait(60)
        _set_policy(gateway, queue, regions=["eu-west-1", "eu-central-1"])
        job_id = gateway.enqueue(queue)  # wakes the held poll: it must re-read the policy
        before = job_row(gateway, job_id)
        poll.thread.join(120)
    assert poll.error is None and poll.response is not None, poll.error
    assert poll.response.status_code == 200 and poll.response.json() == {"lease": None}
    assert job_row(gateway, job_id) == before


def test_region_patterns_match_case_sensitively(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = enroll(gateway, tmp_path, queues=[queue], region="EU-west-1")
    _set_policy(gateway, queue, regions=["eu-*"])
    job_id = gateway.enqueue(queue)
    before = job_row(gateway, job_id)
    assert lease(gateway, agent, wait_seconds=0.5) is None
    assert job_row(gateway, job_id) == before


def test_stale_fencing_id_is_409_and_changes_nothing(gateway, tmp_path):
    agent = enroll(gateway, tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    held = lease_job(gateway, agent, job_id)
    before, logs_before = job_row(gateway, job_id), log_tree(gateway)
    stale = held.fencing - 1
    with gateway.client(agent) as c:
        state = c.post(job_state_path(job_id), json={"fencing": stale, "state": "success", "exit_code": 0})
        logs = c.post(job_logs_path(job_id), json={"fencing": stale, "offset": 0, "data": "forged\n"})
        refused = c.post(job_state_path(job_id), json={"fencing": stale, "state": "refused", "reason": "x"})
        beat = c.post(
            HEARTBEAT_PATH,
            json={"free_slots": 0, "total_slots": 1, "version": "x", "running": [{"job_id": job_id, "fencing": stale}]},
        )
    assert (state.status_code, logs.status_code, refused.status_code) == (409, 409, 409)
    assert beat.status_code == 200 and beat.json()["lost"] == [job_id]
    assert job_row(gateway, job_id) == before  # lease not renewed, state not moved
    assert log_tree(gateway) == logs_before


def test_reporting_on_another_agents_job_is_404_and_changes_nothing(gateway, tmp_path):
    queue = gateway.new_queue()
    holder = enroll(gateway, tmp_path, queues=[queue])
    intruder = enroll(gateway, tmp_path, queues=[queue])  # same queue, still not its job
    job_id = gateway.enqueue(queue)
    held = lease_job(gateway, holder, job_id)
    before, logs_before = job_row(gateway, job_id), log_tree(gateway)
    with gateway.client(intruder) as c:
        state = c.post(job_state_path(job_id), json={"fencing": held.fencing, "state": "failed", "exit_code": 1})
        logs = c.post(job_logs_path(job_id), json={"fencing": held.fencing, "offset": 0, "data": "forged\n"})
        refused = c.post(job_state_path(job_id), json={"fencing": held.fencing, "state": "refused", "reason": "x"})
        beat = c.post(
            HEARTBEAT_PATH,
            json={"free_slots": 0, "total_slots": 1, "version": "x",
                  "running": [{"job_id": job_id, "fencing": held.fencing}]},
        )
    assert (state.status_code, logs.status_code, refused.status_code) == (404, 404, 404)
    # The reply does not tell the two cases apart: no probing for other agents' job ids.
    assert state.json() == logs.json() == {"detail": "no such job held by this agent"}
    assert beat.status_code == 200 and beat.json()["lost"] == [job_id]
    assert job_row(gateway, job_id) == before
    assert log_tree(gateway) == logs_before


def test_logs_of_a_local_logs_queue_are_never_stored_on_the_hosted_side(gateway, tmp_path):
    queue = gateway.new_queue()
    _set_policy(gateway, queue, logs="local")
    agent = enroll(gateway, tmp_path, queues=[queue])
    job_id = gateway.enqueue(queue)
    held = lease_job(gateway, agent, job_id)
    assert held.log_policy == LogPolicy.LOCAL  # the agent was told
    before, logs_before = job_row(gateway, job_id), log_tree(gateway)
    with gateway.client(agent) as c:
        r = c.post(job_logs_path(job_id), json={"fencing": held.fencing, "offset": 0, "data": "customer data\n"})
    assert r.status_code == 403
    assert job_row(gateway, job_id) == before
    assert log_tree(gateway) == logs_before


def test_a_job_the_agent_refused_is_never_offered_to_it_again(gateway, tmp_path):
    queue = gateway.new_queue()
    refuser = enroll(gateway, tmp_path, queues=[queue])
    other = enroll(gateway, tmp_path, queues=[queue])
    job_id = gateway.enqueue(queue)
    held = lease_job(gateway, refuser, job_id)
    with gateway.client(refuser) as c:
        r = c.post(
            job_state_path(job_id), json={"fencing": held.fencing, "state": "refused", "reason": "dag not allowed here"}
        )
    assert r.status_code == 204, r.text
    back = job_row(gateway, job_id)
    assert back["state"] == JobStatus.QUEUED and back["agent_id"] is None  # another agent may take it
    assert lease(gateway, refuser, wait_seconds=2) is None
    assert job_row(gateway, job_id) == back
    assert lease_job(gateway, other, job_id).job_id == job_id


def test_a_refused_job_no_other_agent_may_run_fails_with_the_reason(gateway, tmp_path):
    agent = enroll(gateway, tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    held = lease_job(gateway, agent, job_id)
    with gateway.client(agent) as c:
        r = c.post(
            job_state_path(job_id), json={"fencing": held.fencing, "state": "refused", "reason": "bundle not allowed"}
        )
    assert r.status_code == 204, r.text
    row = job_row(gateway, job_id)
    assert row["state"] == JobStatus.FAILED
    assert "bundle not allowed" in row["reason"]
    assert row["started_at"] is None  # it never ran


@pytest.mark.parametrize("queues", [[], ["*"], ["%"]], ids=["empty", "star", "sql_wildcard"])
def test_wildcard_like_queue_names_grant_nothing(gateway, tmp_path, queues):
    # A token whose queue list is empty or looks like a pattern must not match other queues' jobs.
    agent = enroll(gateway, tmp_path, queues=queues or [gateway.new_queue()])
    if not queues:
        with gateway.home.session() as s:  # an agent row with no queue at all
            from sqlalchemy import update

            from executor_plugin.models import agent_table

            s.execute(update(agent_table).where(agent_table.c.id == agent.agent_id).values(queues="[]"))
            s.commit()
    job_id = gateway.enqueue(gateway.new_queue())
    before = job_row(gateway, job_id)
    assert lease(gateway, agent, wait_seconds=0.5) is None
    assert job_row(gateway, job_id) == before
