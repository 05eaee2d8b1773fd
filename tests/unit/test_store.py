"""The store against a real SQLite database: leasing, fencing, tokens, heartbeats."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from executor_plugin import store
from executor_plugin.models import JobStatus


@pytest.fixture
def session_factory(store_sessions):
    return store_sessions


def _job(session, queue="default", try_number=1, task="t", priority=1):
    job_id = store.enqueue_job(
        session, workload_json="{}", ti_id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id=task,
        run_id="r", map_index=-1, try_number=try_number, queue=queue, priority_weight=priority,
    )
    session.commit()
    return job_id


def _agent(session, queues=("default",), region="eu-1", key="fp1", uses=1):
    token = store.create_token(
        session, token_id=f"tok{key}", secret_hash=store.hash_secret("s"), queues=queues, region=region,
        name=None, ttl=timedelta(hours=1), max_uses=uses,
    )
    agent = store.create_agent(session, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=key)
    session.commit()
    return agent


def test_lease_only_granted_queues_and_fencing_advances(session_factory):
    s = session_factory()
    other = _job(s, queue="eu_pii", task="other")
    mine = _job(s, queue="default", task="mine")
    agent = _agent(s)
    lease = store.lease_next(s, agent, lease_ttl=timedelta(seconds=60))
    assert lease is not None and lease.id == mine and lease.fencing == 1 and lease.state == JobStatus.LEASED
    assert store.lease_next(s, agent, lease_ttl=timedelta(seconds=60)) is None  # eu_pii is not granted
    assert store.job_for_agent(s, agent.id, mine, 1).id == mine
    with pytest.raises(store.StaleFencing):
        store.report_job(s, agent.id, mine, 0, JobStatus.RUNNING)
    with pytest.raises(store.JobNotFound):
        store.report_job(s, agent.id, other, 0, JobStatus.RUNNING)


def test_priority_then_age(session_factory):
    s = session_factory()
    _job(s, task="low", priority=1)
    high = _job(s, task="high", priority=5)
    agent = _agent(s)
    assert store.lease_next(s, agent, lease_ttl=timedelta(seconds=60)).id == high


def test_concurrent_leasers_never_share_a_job(session_factory):
    s = session_factory()
    ids = {_job(s, task=f"t{i}") for i in range(30)}
    agents = [_agent(s, key=f"k{i}") for i in range(4)]
    got: list[str] = []
    lock = threading.Lock()

    def work(agent):
        sess = session_factory()
        while True:
            try:
                job = store.lease_next(sess, agent, lease_ttl=timedelta(seconds=60))
            except Exception:  # SQLite "database is locked" under contention: retry
                sess.rollback()
                continue
            if job is None:
                if not store.queued_exists(sess, agent.queues):
                    return
                continue
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=work, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)


def test_expired_lease_is_requeued_and_late_report_refused(session_factory):
    s = session_factory()
    job_id = _job(s)
    agent = _agent(s)
    lease = store.lease_next(s, agent, lease_ttl=timedelta(seconds=-1))
    assert store.requeue_expired_leases(s) == 1
    s.commit()
    with pytest.raises(store.JobNotFound):  # no longer this agent's
        store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.RUNNING)
    again = store.lease_next(s, agent, lease_ttl=timedelta(seconds=60))
    assert again.id == job_id and again.fencing == lease.fencing + 2


def test_events_are_reported_once(session_factory):
    s = session_factory()
    job_id = _job(s)
    agent = _agent(s)
    lease = store.lease_next(s, agent, lease_ttl=timedelta(seconds=60))
    store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.RUNNING)
    assert [j.state for j in store.pending_events(s)] == [JobStatus.RUNNING]
    store.mark_reported(s, job_id, JobStatus.RUNNING)
    assert store.pending_events(s) == []
    store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.FAILED, exit_code=1, reason="boom")
    store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.FAILED, exit_code=1, reason="boom")  # idempotent
    with pytest.raises(store.StaleFencing):
        store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.SUCCESS)
    (event,) = store.pending_events(s)
    assert (event.state, event.exit_code, event.reason) == (JobStatus.FAILED, 1, "boom")


def test_heartbeat_renews_held_and_returns_lost(session_factory):
    s = session_factory()
    a = _job(s, task="a")
    b = _job(s, task="b")
    agent = _agent(s)
    la = store.lease_next(s, agent, lease_ttl=timedelta(seconds=1))
    lb = store.lease_next(s, agent, lease_ttl=timedelta(seconds=1))
    assert store.cancel_job(s, dag_id="d", task_id="b", run_id="r", map_index=-1, try_number=1)
    lost = store.record_heartbeat(
        s, agent.id, free_slots=2, total_slots=4, version="0.1", cert_not_after=None,
        running=[(a, la.fencing), (b, lb.fencing), ("nope", 1)], lease_ttl=timedelta(hours=1),
    )
    assert lost == sorted([b, "nope"])
    assert store.job_for_agent(s, agent.id, a, la.fencing).lease_expires_at > store.utcnow() + timedelta(minutes=30)
    assert store.get_agent(s, agent.id).slots_free == 2


def test_token_single_use_and_same_key_retry(session_factory):
    s = session_factory()
    store.create_token(
        s, token_id="t1", secret_hash=store.hash_secret("secret"), queues=["q"], region="eu-1", name=None,
        ttl=timedelta(minutes=5), max_uses=1,
    )
    with pytest.raises(store.TokenRejected):
        store.redeem_token(s, token_id="t1", secret="wrong", pubkey_fp="k")
    tok, existing = store.redeem_token(s, token_id="t1", secret="secret", pubkey_fp="k")
    assert existing is None and tok.queues == ("q",)
    agent = store.create_agent(s, agent_id="ag_1", name="n", token=tok, pubkey_fp="k")
    s.commit()
    assert store.redeem_token(s, token_id="t1", secret="secret", pubkey_fp="k")[1] == store.get_agent(s, agent.id)
    with pytest.raises(store.TokenRejected, match="already used"):
        store.redeem_token(s, token_id="t1", secret="secret", pubkey_fp="other")
    store.create_token(
        s, token_id="t2", secret_hash=store.hash_secret("x"), queues=["q"], region="eu-1", name=None,
        ttl=timedelta(seconds=-1), max_uses=1,
    )
    with pytest.raises(store.TokenRejected, match="expired"):
        store.redeem_token(s, token_id="t2", secret="x", pubkey_fp="k")


def test_adoption_sees_finished_but_unreported_jobs(session_factory):
    s = session_factory()
    job_id = _job(s)
    agent = _agent(s)
    lease = store.lease_next(s, agent, lease_ttl=timedelta(seconds=60))
    store.report_job(s, agent.id, job_id, lease.fencing, JobStatus.SUCCESS, exit_code=0)
    key = ("d", "t", "r", -1, 1)
    assert [j.id for j in store.jobs_for_keys(s, [key])] == [job_id]
    store.mark_reported(s, job_id, JobStatus.SUCCESS)
    assert store.jobs_for_keys(s, [key]) == []
