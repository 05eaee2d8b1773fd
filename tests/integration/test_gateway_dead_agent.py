"""An agent declared dead, over the real gateway: it comes back and learns what it lost.

The executor's sweep (``store.requeue_leased_of_offline_agents`` / ``close_running_jobs_of_offline_
agents``, called here the way the executor calls them, with the clock moved forward) requeues or
closes its jobs; the agent's next heartbeat names them in ``lost`` and its late reports are refused.
The sweep acts on every agent of the database, so the test runs its own gateway (not the shared one,
whose other tests' jobs it would touch).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import Column, Integer, MetaData, String, Table, Uuid, insert, select, update

from edge_agent.protocol import HEARTBEAT_PATH, LEASE_PATH, HeartbeatResponse, LeaseResponse, job_state_path
from executor_plugin import store
from executor_plugin.models import JobStatus, job_table

DEAD_AFTER = timedelta(seconds=30)


def _lease(gateway, agent):
    with gateway.client(agent) as c:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 30})
    assert r.status_code == 200, r.text
    lease = LeaseResponse.model_validate(r.json()).lease
    assert lease is not None
    return lease


def _heartbeat(gateway, agent, running) -> HeartbeatResponse:
    body = {"free_slots": 1, "total_slots": 1, "version": "it",
            "running": [{"job_id": job_id, "fencing": fencing} for job_id, fencing in running]}
    with gateway.client(agent) as c:
        r = c.post(HEARTBEAT_PATH, json=body)
    assert r.status_code == 200, r.text
    return HeartbeatResponse.model_validate(r.json())


def _silence(gateway, agent_id: str, seconds: float) -> None:
    """The agent's last heartbeat was ``seconds`` ago."""
    with gateway.home.session() as s:
        store.record_heartbeat(
            s, agent_id, free_slots=1, total_slots=1, version="it", cert_not_after=None, running=[],
            lease_ttl=timedelta(minutes=1), now=store.utcnow() - timedelta(seconds=seconds),
        )
        s.commit()


def test_an_agent_back_from_the_dead_finds_its_jobs_lost(start_gateway, tmp_path):
    gateway = start_gateway()
    _requeued_leased_job_is_lost(gateway, tmp_path)
    _closed_running_job_is_lost_and_the_reply_follows_the_agent_row(gateway, tmp_path)


def _requeued_leased_job_is_lost(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = _lease(gateway, agent)
    _silence(gateway, agent.agent_id, 60)
    with gateway.home.session() as s:
        # The executor's sweep, a minute from now: the agent missed its heartbeats.
        [requeue] = store.requeue_leased_of_offline_agents(
            s, dead_after=DEAD_AFTER, now=store.utcnow() + timedelta(seconds=60)
        )
        s.commit()
    assert (requeue.agent_id, requeue.requeued) == (agent.agent_id, 1)

    reply = _heartbeat(gateway, agent, [(job_id, lease.fencing)])
    assert reply == HeartbeatResponse(drain=False, lost=[job_id])
    with gateway.client(agent) as c:
        late = c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "running"})
    assert late.status_code == 404  # no longer its job (queued again, nobody holds it)

    # It leases the job again under a new fencing id; a report under the old one is stale (409).
    again = _lease(gateway, agent)
    assert again.job_id == job_id and again.fencing == lease.fencing + 2
    with gateway.client(agent) as c:
        stale = c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "running"})
        fresh = c.post(job_state_path(job_id), json={"fencing": again.fencing, "state": "running"})
    assert (stale.status_code, fresh.status_code) == (409, 204)
    assert _heartbeat(gateway, agent, [(job_id, again.fencing)]) == HeartbeatResponse(drain=False, lost=[])


def _closed_running_job_is_lost_and_the_reply_follows_the_agent_row(gateway, tmp_path):
    # The gateway's database has no Airflow tables; a stand-in task_instance table holds the
    # columns the sweep reads.
    with gateway.home.session() as s:
        bind = s.get_bind()
    ti = Table("task_instance", MetaData(), Column("id", Uuid, primary_key=True), Column("state", String(20)),
               Column("try_number", Integer))
    ti.create(bind, checkfirst=True)
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = _lease(gateway, agent)
    with gateway.client(agent) as c:
        assert c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "running"}).status_code == 204
    with gateway.home.session() as s:
        ti_id = s.execute(select(job_table.c.ti_id).where(job_table.c.id == job_id)).scalar_one()
        s.execute(insert(ti).values(id=uuid.UUID(ti_id), state="failed", try_number=1))
        s.commit()
    _silence(gateway, agent.agent_id, 60)
    with gateway.home.session() as s:
        # (A minute from now the first agent is silent too: its running job, with no TI row, closes as well.)
        closed = {
            c.job.id: c.job
            for c in store.close_running_jobs_of_offline_agents(
                s, dead_after=DEAD_AFTER, now=store.utcnow() + timedelta(seconds=60)
            )
        }
        store.drain_agent(s, agent.agent_id)
        s.commit()
    assert closed[job_id].state == JobStatus.FAILED and "settled the task instance as failed" in closed[job_id].reason

    reply = _heartbeat(gateway, agent, [(job_id, lease.fencing)])
    assert reply == HeartbeatResponse(drain=True, lost=[job_id])
    with gateway.client(agent) as c:
        final = c.post(job_state_path(job_id), json={"fencing": lease.fencing, "state": "success", "exit_code": 0})
    assert final.status_code == 409
    with gateway.home.session() as s:
        store.resume_agent(s, agent.agent_id)
        s.execute(update(job_table).where(job_table.c.id == job_id).values(reason="checked"))
        s.commit()
    assert _heartbeat(gateway, agent, []).drain is False
