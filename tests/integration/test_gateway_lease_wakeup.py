"""Held lease polls against a real gateway (SQLite, real TLS): who is woken, by what.

The notifier reads the job table and the agents holding polls once per cycle for all of them; these
tests pin what that must still guarantee end to end: every queued job reaches one of the polls that
may take it, a refused job goes to another agent, and a change of the agent's row (drain,
revocation, policy) reaches a poll it already holds.
"""

from __future__ import annotations

from sqlalchemy import select
from test_gateway_work import HeldPoll, _lease_now

from edge_agent.protocol import LeaseResponse, job_state_path
from executor_plugin import store
from executor_plugin.models import JobStatus, job_table

#: A poll ends long before its own wait when its agent changes; joined this long at most.
ENDS_WITHIN = 20.0


def _lease_of(poll: HeldPoll):
    r = poll.result()
    assert r.status_code == 200, r.text
    return LeaseResponse.model_validate(r.json()).lease


def _job(gateway, job_id):
    with gateway.home.session() as s:
        return s.execute(select(job_table).where(job_table.c.id == job_id)).one()


def _hold_then_change(gateway, client, free_slots: int, change) -> tuple[HeldPoll, bool]:
    """Hold a poll, then ``change(session)`` the agent's row; also whether the poll then ended within
    :data:`ENDS_WITHIN`."""
    poll = HeldPoll(client, {"free_slots": free_slots, "wait_seconds": 45})
    assert poll.sent.wait(60)
    with gateway.home.session() as s:
        change(s)
        s.commit()
    poll.thread.join(ENDS_WITHIN)
    return poll, not poll.thread.is_alive()


def test_every_job_reaches_exactly_one_of_the_polls_on_its_queue(gateway, tmp_path):
    queue = gateway.new_queue()
    agents = [gateway.register(tmp_path, queues=[queue]) for _ in range(4)]
    clients = [gateway.client(agent) for agent in agents]
    try:
        polls = [HeldPoll(c, {"free_slots": 1, "wait_seconds": 45}) for c in clients]
        assert all(p.sent.wait(60) for p in polls)
        jobs = {gateway.enqueue(queue, task_id=f"t{i}") for i in range(len(agents))}
        leases = [_lease_of(p) for p in polls]
    finally:
        for c in clients:
            c.close()
    assert all(lease is not None for lease in leases)
    assert {lease.job_id for lease in leases} == jobs  # each job once, each poll one job
    holders = {_job(gateway, job_id).agent_id for job_id in jobs}
    assert holders == {agent.agent_id for agent in agents}


def test_a_job_refused_by_one_agent_goes_to_another_agents_held_poll(gateway, tmp_path):
    queue = gateway.new_queue()
    refuser = gateway.register(tmp_path, queues=[queue])
    other = gateway.register(tmp_path, queues=[queue])
    job_id = gateway.enqueue(queue)
    held = _lease_now(gateway, refuser)
    assert held.job_id == job_id
    with gateway.client(refuser) as rc, gateway.client(other) as oc:
        refuser_poll = HeldPoll(rc, {"free_slots": 1, "wait_seconds": 4})
        other_poll = HeldPoll(oc, {"free_slots": 1, "wait_seconds": 45})
        assert refuser_poll.sent.wait(60) and other_poll.sent.wait(60)
        with gateway.client(refuser) as c:
            r = c.post(job_state_path(job_id), json={"fencing": held.fencing, "state": "refused", "reason": "no"})
        assert r.status_code == 204, r.text
        got = _lease_of(other_poll)
        assert got is not None and got.job_id == job_id
        assert _lease_of(refuser_poll) is None


def test_draining_ends_a_held_poll_without_a_lease(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = gateway.register(tmp_path, queues=[queue])
    with gateway.client(agent, timeout=120) as c:
        poll, ended = _hold_then_change(gateway, c, 1, lambda s: store.drain_agent(s, agent.agent_id))
        job_id = gateway.enqueue(queue)
        assert _lease_of(poll) is None
    assert ended, f"the held poll of a drained agent did not end within {ENDS_WITHIN} s"
    assert _job(gateway, job_id).state == JobStatus.QUEUED


def test_revocation_ends_a_held_poll_without_free_slots(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.client(agent, timeout=120) as c:
        poll, ended = _hold_then_change(gateway, c, 0, lambda s: store.revoke_agent(s, agent.agent_id))
        r = poll.result()
    assert ended, f"the held poll of a revoked agent did not end within {ENDS_WITHIN} s"
    assert r.status_code == 403


def test_a_policy_change_lets_a_held_poll_lease_a_job_already_queued(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = gateway.register(tmp_path, queues=[queue])  # region it-1
    with gateway.home.session() as s:
        store.set_queue_policy(s, queue, regions=["eu-*"])
        s.commit()
    job_id = gateway.enqueue(queue)
    with gateway.client(agent, timeout=120) as c:
        poll = HeldPoll(c, {"free_slots": 1, "wait_seconds": 45})
        assert poll.sent.wait(60)
        # Queued, but not for this agent's region: the poll stays held ...
        with gateway.home.session() as s:
            store.set_queue_policy(s, queue, regions=["it-*"])
            s.commit()
        # ... until the notifier's agent re-read sees that the agent may now serve the queue.
        got = _lease_of(poll)
    assert got is not None and got.job_id == job_id
