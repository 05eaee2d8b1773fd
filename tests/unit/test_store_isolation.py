"""The store's isolation and identity-lifecycle functions against a real SQLite file: queue
policies at lease time, refusals, revocation, drain/resume, certificate renewal, the Execution API
binding query."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from executor_plugin import store
from executor_plugin.models import AgentStatus, JobStatus, job_refusal_table

TTL = timedelta(seconds=60)


@pytest.fixture
def s(store_sessions):
    with store_sessions() as session:
        yield session


def job(s, queue="default", task="t", try_number=1, ti_id="00000000-0000-0000-0000-000000000001"):
    job_id = store.enqueue_job(
        s, workload_json="{}", ti_id=ti_id, dag_id="d", task_id=task, run_id="r", map_index=-1,
        try_number=try_number, queue=queue, priority_weight=1,
    )
    s.commit()
    return job_id


def agent(s, key, queues=("default",), region="eu-west-1"):
    token = store.create_token(
        s, token_id=f"tok{key}", secret_hash=store.hash_secret("x"), queues=queues, region=region, name=None,
        ttl=timedelta(hours=1), max_uses=1,
    )
    created = store.create_agent(s, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=f"fp{key}")
    s.commit()
    return created


def state_of(s, job_id):
    return s.execute(select(store.job_table.c.state).where(store.job_table.c.id == job_id)).scalar_one()


# -- queue policies --------------------------------------------------------------------------------


def test_policy_set_keeps_unset_fields_and_lists_sorted(s):
    created = store.set_queue_policy(s, "eu_pii", regions=["eu-*"])
    assert (created.regions, created.logs) == (("eu-*",), "hosted")
    changed = store.set_queue_policy(s, "eu_pii", logs="local")
    assert (changed.regions, changed.logs) == (("eu-*",), "local")
    store.set_queue_policy(s, "a_queue", logs="local")
    assert [p.queue for p in store.list_queue_policies(s)] == ["a_queue", "eu_pii"]
    assert store.get_queue_policy(s, "a_queue").regions is None
    assert store.delete_queue_policy(s, "a_queue") and not store.delete_queue_policy(s, "a_queue")


def test_lease_excludes_a_region_the_policy_does_not_admit_even_after_registration(s):
    us = agent(s, "us", queues=("eu_pii", "default"), region="us-east-1")
    eu = agent(s, "eu", queues=("eu_pii",), region="eu-west-1")
    pii = job(s, queue="eu_pii", task="pii")
    # No policy yet: the us agent may take it. The policy arrives after registration and applies.
    assert store.eligible_queues(s, us) == ("eu_pii", "default")
    store.set_queue_policy(s, "eu_pii", regions=["eu-*"])
    s.commit()
    assert store.eligible_queues(s, us) == ("default",)
    assert store.lease_next(s, us, lease_ttl=TTL) is None
    assert not store.queued_exists(s, store.eligible_queues(s, us))
    leased = store.lease_next(s, eu, lease_ttl=TTL)
    assert leased is not None and leased.id == pii and leased.agent_id == eu.id


def test_lease_reads_the_agent_row_not_the_callers_copy(s):
    a = agent(s, "a")
    job(s)
    store.revoke_agent(s, a.id)
    s.commit()
    assert store.lease_next(s, a, lease_ttl=TTL) is None  # `a` still says active
    assert store.queued_exists(s, ("default",))


# -- refusals --------------------------------------------------------------------------------------


def test_refusal_requeues_for_another_agent_and_is_never_offered_back(s):
    first, second = agent(s, "1"), agent(s, "2")
    job_id = job(s)
    leased = store.lease_next(s, first, lease_ttl=TTL)
    refused = store.report_job(s, first.id, job_id, leased.fencing, "refused", reason="dag not allowed")
    s.commit()
    assert (refused.state, refused.agent_id, refused.fencing) == (JobStatus.QUEUED, None, leased.fencing + 1)
    assert store.pending_events(s) == []  # not a scheduler event
    assert store.lease_next(s, first, lease_ttl=TTL) is None
    assert not store.queued_exists(s, ("default",), refused_by=first.id)
    assert store.queued_exists(s, ("default",), refused_by=second.id)
    again = store.lease_next(s, second, lease_ttl=TTL)
    assert again is not None and again.id == job_id
    [row] = s.execute(select(job_refusal_table)).all()
    assert (row.agent_id, row.job_id, row.reason) == (first.id, job_id, "dag not allowed")


def test_a_retry_of_a_refused_task_is_not_offered_to_that_agent_either(s):
    first, _second = agent(s, "1"), agent(s, "2")
    job_id = job(s)
    leased = store.lease_next(s, first, lease_ttl=TTL)
    store.refuse_job(s, first.id, job_id, leased.fencing, reason="no")
    s.commit()
    # The scheduler retries the task: a new try (and a new TI id) of the same task instance.
    job(s, try_number=2, ti_id="00000000-0000-0000-0000-000000000002")
    assert store.lease_next(s, first, lease_ttl=TTL) is None


def test_refusal_with_no_other_possible_agent_fails_the_job_with_the_reason(s):
    only = agent(s, "only")
    agent(s, "elsewhere", queues=("default",), region="us-east-1")
    store.set_queue_policy(s, "default", regions=["eu-*"])
    agent(s, "gone")
    store.revoke_agent(s, "ag_gone")
    s.commit()
    job_id = job(s)
    leased = store.lease_next(s, only, lease_ttl=TTL)
    failed = store.refuse_job(s, only.id, job_id, leased.fencing, reason="bundle not allowed")
    s.commit()
    assert failed.state == JobStatus.FAILED
    assert failed.reason.startswith(f"refused by agent {only.id}: bundle not allowed")
    assert [j.id for j in store.pending_events(s)] == [job_id]


def test_repeating_a_refusal_is_harmless_and_a_stale_one_is_refused(s):
    first, _ = agent(s, "1"), agent(s, "2")
    job_id = job(s)
    leased = store.lease_next(s, first, lease_ttl=TTL)
    store.refuse_job(s, first.id, job_id, leased.fencing, reason="no")
    s.commit()
    repeat = store.refuse_job(s, first.id, job_id, leased.fencing, reason="no")
    assert repeat.state == JobStatus.QUEUED
    with pytest.raises(store.JobNotFound):
        store.refuse_job(s, first.id, job_id, leased.fencing + 1, reason="no")


def test_a_started_job_cannot_be_refused(s):
    a, _ = agent(s, "1"), agent(s, "2")
    job_id = job(s)
    leased = store.lease_next(s, a, lease_ttl=TTL)
    store.report_job(s, a.id, job_id, leased.fencing, JobStatus.RUNNING)
    with pytest.raises(store.StaleFencing):
        store.refuse_job(s, a.id, job_id, leased.fencing, reason="too late")


def test_purge_refusals(s):
    a, _ = agent(s, "1"), agent(s, "2")
    job_id = job(s)
    leased = store.lease_next(s, a, lease_ttl=TTL)
    store.refuse_job(s, a.id, job_id, leased.fencing, reason="no")
    s.commit()
    assert store.purge_refusals(s, older_than=store.utcnow() - timedelta(days=1)) == 0
    assert store.purge_refusals(s, older_than=store.utcnow() + timedelta(seconds=1)) == 1


# -- revocation, drain, renewal, binding -----------------------------------------------------------


def test_revoke_requeues_leased_jobs_and_reports_running_ones(s):
    a = agent(s, "a")
    leased_id, running_id = job(s, task="leased"), job(s, task="running")
    one = store.lease_next(s, a, lease_ttl=TTL)
    two = store.lease_next(s, a, lease_ttl=TTL)
    running = one if one.id == running_id else two
    store.report_job(s, a.id, running.id, running.fencing, JobStatus.RUNNING)
    revocation = store.revoke_agent(s, a.id)
    s.commit()
    assert revocation.agent.state == AgentStatus.REVOKED
    assert (revocation.requeued, revocation.running) == (1, (running_id,))
    assert state_of(s, leased_id) == JobStatus.QUEUED and state_of(s, running_id) == JobStatus.RUNNING
    assert store.revoke_agent(s, a.id).requeued == 0  # idempotent
    with pytest.raises(store.AgentNotFound):
        store.revoke_agent(s, "ag_nobody")


def test_drain_and_resume(s):
    a = agent(s, "a")
    job(s)
    assert store.drain_agent(s, a.id).state == AgentStatus.DRAINING
    assert store.lease_next(s, a, lease_ttl=TTL) is None
    assert store.resume_agent(s, a.id).state == AgentStatus.ACTIVE
    assert store.lease_next(s, a, lease_ttl=TTL) is not None
    store.revoke_agent(s, a.id)
    with pytest.raises(store.AgentRevoked):
        store.resume_agent(s, a.id)
    with pytest.raises(store.AgentNotFound):
        store.drain_agent(s, "ag_nobody")


def test_renew_records_the_new_certificate_unless_revoked(s):
    a = agent(s, "a")
    not_after = store.utcnow() + timedelta(hours=1)
    renewed = store.renew_agent_cert(s, a.id, serial="abc", not_after=not_after, issuer="ff" * 32, pubkey_fp="new")
    assert (renewed.cert_serial, renewed.cert_issuer, renewed.pubkey_fp) == ("abc", "ff" * 32, "new")
    assert renewed.queues == a.queues and renewed.region == a.region
    store.revoke_agent(s, a.id)
    with pytest.raises(store.AgentRevoked):
        store.renew_agent_cert(s, a.id, serial="def", not_after=not_after, issuer="ff" * 32, pubkey_fp="newer")
    assert store.get_agent(s, a.id).cert_serial == "abc"


def test_agent_holds_ti_only_while_leased_or_running(s):
    a, b = agent(s, "a"), agent(s, "b")
    ti = "00000000-0000-0000-0000-0000000000aa"
    job_id = job(s, ti_id=ti)
    assert not store.agent_holds_ti(s, a.id, ti)
    leased = store.lease_next(s, a, lease_ttl=TTL)
    assert store.agent_holds_ti(s, a.id, ti) and not store.agent_holds_ti(s, b.id, ti)
    store.report_job(s, a.id, job_id, leased.fencing, JobStatus.RUNNING)
    assert store.agent_holds_ti(s, a.id, ti)
    store.report_job(s, a.id, job_id, leased.fencing, JobStatus.SUCCESS, exit_code=0)
    assert not store.agent_holds_ti(s, a.id, ti)
