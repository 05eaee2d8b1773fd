"""The lease notifier's snapshot reads (``gateway.wait_probe``) against a real SQLite database:
queued counts, refusals, and what the agents holding polls may lease now."""

from __future__ import annotations

from datetime import timedelta

import pytest

from executor_plugin import store
from executor_plugin.gateway import wait_probe
from executor_plugin.gateway.wait_probe import HolderView, QueuedWork
from executor_plugin.models import AgentStatus

TTL = timedelta(seconds=60)


@pytest.fixture
def session(store_sessions):
    with store_sessions() as s:
        yield s


def _job(session, queue, task, try_number=1):
    job_id = store.enqueue_job(
        session, workload_json="{}", ti_id=f"00000000-0000-0000-0000-{abs(hash(task)) % 10**12:012d}",
        dag_id="d", task_id=task, run_id="r", map_index=-1, try_number=try_number, queue=queue, priority_weight=1,
    )
    session.commit()
    return job_id


def _agent(session, key, queues, region="eu-west-1"):
    token = store.create_token(
        session, token_id=f"tok{key}", secret_hash=store.hash_secret("s"), queues=queues, region=region,
        name=None, ttl=timedelta(hours=1), max_uses=1,
    )
    agent = store.create_agent(session, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=key)
    session.commit()
    return agent


def _refuse(session, agent, job_id):
    leased = store.lease_next(session, agent, lease_ttl=TTL)
    assert leased is not None and leased.id == job_id
    store.report_job(session, agent.id, job_id, leased.fencing, store.REFUSED, reason="not here")
    session.commit()


def test_empty_table_has_no_work(session):
    work = wait_probe.queued_work(session)
    assert work == QueuedWork({}, {})
    assert work.takeable("ag_x", "a") == 0


def test_counts_queued_jobs_per_queue_and_ignores_other_states(session):
    for i in range(3):
        _job(session, "a", f"a{i}")
    _job(session, "b", "b0")
    agent = _agent(session, "1", ["c"])
    leased = _job(session, "c", "c0")
    assert store.lease_next(session, agent, lease_ttl=TTL).id == leased
    work = wait_probe.queued_work(session)
    assert work.queued == {"a": 3, "b": 1}
    assert work.refused == {}
    assert work.takeable("ag_1", "a") == 3 and work.takeable("ag_1", "c") == 0


def test_refused_jobs_are_counted_per_agent_and_queue(session):
    refuser = _agent(session, "r", ["a"])
    _agent(session, "o", ["a"])  # another taker, so the refused job goes back to the queue
    refused = _job(session, "a", "refused")
    _refuse(session, refuser, refused)
    work = wait_probe.queued_work(session)
    assert work.queued == {"a": 1}
    assert work.refused == {("ag_r", "a"): 1}
    assert work.takeable("ag_r", "a") == 0  # the only job there is one it refused
    assert work.takeable("ag_o", "a") == 1
    _job(session, "a", "fresh")
    assert wait_probe.queued_work(session).takeable("ag_r", "a") == 1
    # A refusal covers the task instance: its retry, queued later, is not for the refuser either.
    _job(session, "a", "refused", try_number=2)
    work = wait_probe.queued_work(session)
    assert work.queued == {"a": 3} and work.refused == {("ag_r", "a"): 2}


def test_refusals_of_jobs_no_longer_queued_are_not_counted(session):
    refuser = _agent(session, "r", ["a"])
    taker = _agent(session, "o", ["a"])
    job_id = _job(session, "a", "t")
    _refuse(session, refuser, job_id)
    assert store.lease_next(session, taker, lease_ttl=TTL).id == job_id
    assert wait_probe.queued_work(session) == QueuedWork({}, {})


def test_holder_views_follow_state_grants_and_policies(session):
    eu = _agent(session, "eu", ["a", "b"], region="eu-west-1")
    us = _agent(session, "us", ["a"], region="us-east-1")
    store.set_queue_policy(session, "b", regions=["us-*"])
    session.commit()
    views = wait_probe.holder_views(session, [eu.id, us.id, "ag_gone", eu.id])
    assert views == {
        eu.id: HolderView(AgentStatus.ACTIVE, frozenset({"a"})),  # b is admitted in us-* only
        us.id: HolderView(AgentStatus.ACTIVE, frozenset({"a"})),
    }
    # The same decision as a lease attempt's.
    assert views[eu.id].eligible == frozenset(store.eligible_queues(session, eu))
    store.set_queue_policy(session, "b", regions=["eu-*"])
    store.drain_agent(session, us.id)
    session.commit()
    views = wait_probe.holder_views(session, [eu.id, us.id])
    assert views[eu.id].eligible == frozenset({"a", "b"})
    assert views[us.id] == HolderView(AgentStatus.DRAINING, frozenset())
    store.revoke_agent(session, eu.id)
    session.commit()
    assert wait_probe.holder_views(session, [eu.id])[eu.id].state == AgentStatus.REVOKED
    assert wait_probe.holder_views(session, []) == {}


def test_holder_views_take_thousands_of_ids_in_one_statement(session):
    agents = [_agent(session, str(i), ["a"]) for i in range(3)]
    wanted = [f"ag_missing{i}" for i in range(40_000)] + [a.id for a in agents]  # past SQLite's 32,766 parameters
    assert set(wait_probe.holder_views(session, wanted)) == {a.id for a in agents}
