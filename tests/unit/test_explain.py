"""``executor_plugin.explain``: every reason an agent cannot take a task, and the job's own state.

The decision is pure and is tested with small agent stand-ins; ``gather`` is tested against a real
SQLite database written through the real store (agents registered from tokens, heartbeats, leases,
refusals) plus Airflow's own ``task_instance`` table.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

# Before anything imports Airflow: never let the test process touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from sqlalchemy import create_engine, insert  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from executor_plugin import explain as ex  # noqa: E402
from executor_plugin import store  # noqa: E402
from executor_plugin.models import JobStatus, metadata  # noqa: E402
from executor_plugin.policy import QueuePolicy, may_lease  # noqa: E402

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
WINDOW = timedelta(seconds=30)
OURS = "LocalExecutor,executor_plugin.EdgeAgentExecutor"
REF = ex.TaskRef("dag", "task", "run")


@dataclass(frozen=True)
class FakeAgent:
    """The agent facts the decision reads (``store.Agent`` has them all)."""

    id: str
    name: str = ""
    queues: tuple[str, ...] = ("default",)
    region: str = "eu-west-1"
    state: str = "active"
    slots_free: int = 2
    slots_total: int = 4
    last_heartbeat: datetime | None = NOW - timedelta(seconds=5)

    heartbeat_age = store.Agent.heartbeat_age
    is_online = store.Agent.is_online


def verdict(agent: FakeAgent, *, queue: str = "default", policy: QueuePolicy | None = None,
            refusal: ex.Refusal | None = None, holds_job: bool = False) -> ex.AgentVerdict:
    return ex.agent_verdict(
        agent, queue=queue, policy=policy, refusal=refusal, holds_job=holds_job, now=NOW, window=WINDOW
    )


def codes(v: ex.AgentVerdict) -> list[str]:
    return [r.code for r in v.reasons]


def job(try_number: int = 1, state: str = JobStatus.QUEUED, agent_id: str | None = None, **kw) -> ex.JobFacts:
    return ex.JobFacts(
        id=f"job{try_number}", try_number=try_number, queue=kw.pop("queue", "default"), state=state,
        agent_id=agent_id, queued_at=NOW - timedelta(seconds=90), **kw,
    )


def explained(agents, *, ti=None, jobs=(), policy=None, refusals=None, ref=REF, executors=OURS) -> ex.Explanation:
    ti = ti if ti is not None else ex.TaskFacts(state="queued", try_number=1, queue="default", executor="EdgeAgentExecutor")
    return ex.explain(
        ref, ti=ti, jobs=list(jobs), agents=list(agents), policy=policy, refusals=refusals or {},
        configured_executors=executors, now=NOW, window=WINDOW,
    )


# ---------------------------------------------------------------------------------------------------
# One agent's verdict
# ---------------------------------------------------------------------------------------------------


def test_an_online_active_agent_granted_the_queue_with_a_free_slot_can_take_it():
    v = verdict(FakeAgent("a1", name="alpha"))
    assert v.can_take and v.online and v.reasons == () and v.name == "alpha"


def test_queue_not_granted():
    v = verdict(FakeAgent("a1", queues=("gpu", "etl")), queue="default")
    assert codes(v) == [ex.QUEUE_NOT_SERVED] and not v.can_take
    assert "'default' is not granted" in v.reasons[0].message and "gpu, etl" in v.reasons[0].message


def test_region_excluded_by_the_queue_policy():
    policy = QueuePolicy(queue="default", regions=("eu-*",))
    assert verdict(FakeAgent("a1", region="eu-west-1"), policy=policy).can_take
    v = verdict(FakeAgent("a1", region="us-east-1"), policy=policy)
    assert codes(v) == [ex.REGION_EXCLUDED]
    assert "us-east-1" in v.reasons[0].message and "eu-*" in v.reasons[0].message


def test_refused_by_the_agents_local_policy():
    refusal = ex.Refusal("a1", try_number=1, reason="dag not in allow-list", refused_at=NOW - timedelta(minutes=3))
    v = verdict(FakeAgent("a1"), refusal=refusal)
    assert codes(v) == [ex.REFUSED]
    assert "dag not in allow-list" in v.reasons[0].message and "try 1" in v.reasons[0].message


def test_draining():
    v = verdict(FakeAgent("a1", state="draining"))
    assert codes(v) == [ex.DRAINING] and v.online


def test_offline_after_the_window_and_when_it_never_sent_a_heartbeat():
    late = verdict(FakeAgent("a1", last_heartbeat=NOW - timedelta(seconds=31)))
    assert codes(late) == [ex.OFFLINE] and not late.online and "31 s ago" in late.reasons[0].message
    at_limit = verdict(FakeAgent("a1", last_heartbeat=NOW - WINDOW))
    assert at_limit.can_take, "a heartbeat exactly dead_after old is still online (the executor's rule)"
    never = verdict(FakeAgent("a1", last_heartbeat=None))
    assert codes(never) == [ex.OFFLINE] and "never sent a heartbeat" in never.reasons[0].message


def test_no_free_slots_only_counts_for_an_online_agent():
    assert codes(verdict(FakeAgent("a1", slots_free=0))) == [ex.NO_FREE_SLOTS]
    # An offline agent's slot count is stale: offline is the reason, not the slots.
    assert codes(verdict(FakeAgent("a1", slots_free=0, last_heartbeat=None))) == [ex.OFFLINE]


def test_revoked_lists_revoked_but_not_stale_liveness():
    v = verdict(FakeAgent("a1", state="revoked", last_heartbeat=None, slots_free=0))
    assert codes(v) == [ex.REVOKED]


def test_every_reason_is_listed_together():
    policy = QueuePolicy(queue="default", regions=("eu-*",))
    refusal = ex.Refusal("a1", 2, None, NOW)
    v = verdict(
        FakeAgent("a1", queues=("other",), region="us-1", state="draining", last_heartbeat=NOW - timedelta(hours=3)),
        policy=policy, refusal=refusal,
    )
    assert codes(v) == [ex.QUEUE_NOT_SERVED, ex.REGION_EXCLUDED, ex.REFUSED, ex.DRAINING, ex.OFFLINE]
    assert "no reason given" in v.reasons[2].message and "3 h ago" in v.reasons[4].message


# ---------------------------------------------------------------------------------------------------
# The whole answer
# ---------------------------------------------------------------------------------------------------


def test_summary_names_the_agents_that_can_take_it():
    result = explained([FakeAgent("a1", name="alpha"), FakeAgent("a2", name="beta", state="draining")])
    assert [v.agent_id for v in result.takers] == ["a1"]
    assert result.summary == "1 of 2 agent(s) can take it now: alpha"


def test_summary_when_nobody_is_granted_the_queue():
    ti = ex.TaskFacts(state="queued", try_number=1, queue="nobody", executor="EdgeAgentExecutor")
    result = explained([FakeAgent("a1"), FakeAgent("a2", state="revoked", queues=("nobody",))], ti=ti)
    assert result.queue == "nobody"
    assert result.summary == "no agent can take it: no agent is granted queue 'nobody'"


def test_summary_when_every_granted_agent_is_in_an_excluded_region():
    policy = QueuePolicy(queue="default", regions=("eu-*",), logs="local")
    result = explained([FakeAgent("a1", region="us-1"), FakeAgent("a2", queues=("x",))], policy=policy)
    assert "regions its policy excludes" in result.summary
    assert result.logs == "local" and result.regions == ("eu-*",)


def test_summary_when_no_agent_is_registered():
    assert explained([]).summary.startswith("no agent can take it: no agent is registered")


def test_a_task_of_another_executor_says_so():
    ti = ex.TaskFacts(state="success", try_number=1, queue="default", executor="LocalExecutor")
    result = explained([FakeAgent("a1")], ti=ti)
    assert not result.on_edge_agents
    assert result.summary == "this task instance runs on executor LocalExecutor, not on edge agents"


def test_the_holder_of_a_running_job_is_marked_and_not_blamed_for_its_full_slots():
    agents = [FakeAgent("a1", name="alpha", slots_free=0), FakeAgent("a2", name="beta")]
    result = explained(agents, jobs=[job(state=JobStatus.RUNNING, agent_id="a1", started_at=NOW - timedelta(seconds=20))])
    holder, other = result.agents
    assert holder.holds_job and holder.reasons == () and not other.holds_job
    assert result.job_status.startswith("running on agent alpha (a1) since 2026-11-21T11:59:40")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (job(), "queued since 2026-11-21T11:58:30+00:00 (90 s): waiting for an agent"),
        (job(state=JobStatus.LEASED, agent_id="a1", leased_at=NOW), "leased to agent alpha (a1) at 2026-11-21T12:00:00"),
        (
            job(state=JobStatus.FAILED, agent_id="gone", finished_at=NOW, exit_code=1, reason="boom"),
            "failed at 2026-11-21T12:00:00+00:00 on agent gone, exit code 1: boom",
        ),
        (job(state=JobStatus.CANCELLED, finished_at=NOW, reason="revoked by the scheduler"), "cancelled at"),
    ],
)
def test_job_status_sentence(facts, expected):
    assert explained([FakeAgent("a1", name="alpha")], jobs=[facts]).job_status.startswith(expected)


def test_without_a_job_the_status_comes_from_the_task_instance():
    scheduled = ex.TaskFacts(state="scheduled", try_number=0, queue="default", executor=None)
    result = explained([FakeAgent("a1")], ti=scheduled)
    assert result.job_status == "not queued yet: the task instance is scheduled"
    assert result.task.try_number is None
    done = ex.TaskFacts(state="success", try_number=2, queue="default", executor="EdgeAgentExecutor")
    assert "purged an hour after" in explained([FakeAgent("a1")], ti=done).job_status


def test_the_try_asked_for_is_explained_and_its_jobs_queue_wins():
    ti = ex.TaskFacts(state="queued", try_number=2, queue="default", executor="EdgeAgentExecutor")
    jobs = [job(1, JobStatus.FAILED, "a1", queue="gpu", finished_at=NOW), job(2)]
    first = explained([FakeAgent("a1")], ti=ti, jobs=jobs, ref=ex.TaskRef("dag", "task", "run", try_number=1))
    assert first.task.try_number == 1 and first.queue == "gpu" and first.job.id == "job1"
    current = explained([FakeAgent("a1")], ti=ti, jobs=jobs)
    assert current.task.try_number == 2 and current.queue == "default"


def test_no_task_instance_and_no_job_is_task_not_found():
    with pytest.raises(ex.TaskNotFound, match="no task instance dag/run/task"):
        ex.explain(REF, ti=None, jobs=[], agents=[], policy=None, refusals={}, configured_executors=OURS, now=NOW)


def test_to_dict_is_json():
    result = explained([FakeAgent("a1", state="draining")], jobs=[job()])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["agents"][0]["reasons"][0]["code"] == ex.DRAINING
    assert data["job"]["queued_at"] == "2026-11-21T11:58:30+00:00"
    assert data["task"] == {"dag_id": "dag", "task_id": "task", "run_id": "run", "map_index": -1, "try_number": 1}


@pytest.mark.parametrize(
    ("executor", "configured", "ours"),
    [
        (None, "executor_plugin.EdgeAgentExecutor,LocalExecutor", True),
        (None, "LocalExecutor,executor_plugin.EdgeAgentExecutor", False),
        ("EdgeAgentExecutor", OURS, True),
        ("executor_plugin.EdgeAgentExecutor", OURS, True),
        ("edge", "LocalExecutor,edge:executor_plugin.executor.EdgeAgentExecutor", True),
        ("LocalExecutor", OURS, False),
        ("local", "local:LocalExecutor,executor_plugin.EdgeAgentExecutor", False),
    ],
)
def test_runs_on_edge_agents(executor, configured, ours):
    assert ex.runs_on_edge_agents(executor, configured) is ours


@pytest.mark.parametrize("state", ["active", "draining", "revoked"])
@pytest.mark.parametrize("queues", [("default",), ("gpu",)])
@pytest.mark.parametrize("region", ["eu-west-1", "us-east-1"])
@pytest.mark.parametrize("policy", [None, QueuePolicy(queue="default", regions=("eu-*",))])
def test_the_policy_reasons_agree_with_may_lease(state, queues, region, policy):
    """Explain lists every reason, leasing stops at the first: both must reach the same verdict."""
    agent = FakeAgent("a1", queues=queues, region=region, state=state)
    policy_codes = set(codes(verdict(agent, policy=policy))) & {ex.REVOKED, ex.QUEUE_NOT_SERVED, ex.REGION_EXCLUDED,
                                                                 ex.DRAINING}
    assert (not policy_codes) is may_lease(agent, "default", policy)[0]


# ---------------------------------------------------------------------------------------------------
# gather: the same answer from real rows
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path):
    """A SQLite file with our tables and Airflow's task_instance table (foreign keys not enforced)."""
    from airflow.models import import_all_models
    from airflow.models.taskinstance import TaskInstance

    import_all_models()
    engine = create_engine(f"sqlite:///{tmp_path / 'airflow.db'}", connect_args={"check_same_thread": False})
    metadata.create_all(engine)
    TaskInstance.__table__.create(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def register(session, name: str, queues=("default",), region="eu-west-1", slots=(2, 4), heartbeat=True) -> store.Agent:
    token = store.create_token(
        session, token_id=f"tok-{name}", secret_hash=store.hash_secret("s"), queues=queues, region=region,
        name=name, ttl=timedelta(hours=1), max_uses=1,
    )
    agent = store.create_agent(session, agent_id=f"ag-{name}", name=name, token=token, pubkey_fp=f"fp-{name}")
    if heartbeat:
        store.record_heartbeat(
            session, agent.id, free_slots=slots[0], total_slots=slots[1], version="1.0", cert_not_after=None,
            running=[], lease_ttl=timedelta(minutes=1),
        )
    session.commit()
    return agent


def add_task_instance(session, *, dag_id="dag", task_id="task", run_id="run", queue="default", state="queued",
                      try_number=1, executor="EdgeAgentExecutor", map_index=-1) -> str:
    from airflow.models.taskinstance import TaskInstance

    ti_id = uuid.uuid4()
    session.execute(
        insert(TaskInstance.__table__).values(
            id=ti_id, dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, try_number=try_number,
            pool="default_pool", state=state, queue=queue, executor=executor,
        )
    )
    session.commit()
    return str(ti_id)


def enqueue(session, ti_id: str, *, queue="default", task_id="task", try_number=1) -> str:
    job_id = store.enqueue_job(
        session, workload_json="{}", ti_id=ti_id, dag_id="dag", task_id=task_id, run_id="run", map_index=-1,
        try_number=try_number, queue=queue, priority_weight=1,
    )
    session.commit()
    return job_id


def test_gather_reads_agents_policy_refusals_and_the_job(sessions):
    s = sessions()
    taker = register(s, "taker")
    refuser = register(s, "refuser")
    drained = register(s, "drained")
    store.drain_agent(s, drained.id)
    silent = register(s, "silent", heartbeat=False)
    elsewhere = register(s, "elsewhere", queues=("default",), region="us-1")
    other_queue = register(s, "other-queue", queues=("gpu",))
    store.set_queue_policy(s, "default", regions=["eu-*"], logs="local")
    s.commit()
    ti_id = add_task_instance(s)
    job_id = enqueue(s, ti_id)
    # The refuser leases it first and its local policy refuses it: back to the queue for the taker.
    leased = store.lease_next(s, refuser, lease_ttl=timedelta(minutes=1))
    assert leased is not None and leased.id == job_id
    store.refuse_job(s, refuser.id, job_id, leased.fencing, reason="task not allowed here")
    s.commit()

    result = ex.gather(s, REF, configured_executors=OURS, window=WINDOW)
    by_name = {v.name: v for v in result.agents}
    assert by_name["taker"].can_take and by_name["taker"].reasons == ()
    assert codes(by_name["refuser"]) == [ex.REFUSED] and "task not allowed here" in by_name["refuser"].reasons[0].message
    assert codes(by_name["drained"]) == [ex.DRAINING]
    assert codes(by_name["silent"]) == [ex.OFFLINE]
    assert codes(by_name["elsewhere"]) == [ex.REGION_EXCLUDED]
    assert codes(by_name["other-queue"]) == [ex.QUEUE_NOT_SERVED]
    assert result.job is not None and result.job.id == job_id and result.job.state == JobStatus.QUEUED
    assert result.job_status.startswith("queued since")
    assert result.logs == "local" and result.regions == ("eu-*",)
    assert result.summary == "1 of 6 agent(s) can take it now: taker"
    assert {taker.id, silent.id, elsewhere.id, other_queue.id} <= {v.agent_id for v in result.agents}
    s.close()


def test_gather_on_an_unserved_queue_and_an_unknown_task(sessions):
    s = sessions()
    register(s, "only-default")
    ti_id = add_task_instance(s, task_id="stranded", queue="nobody_serves_this")
    enqueue(s, ti_id, queue="nobody_serves_this", task_id="stranded")
    result = ex.gather(s, ex.TaskRef("dag", "stranded", "run"), configured_executors=OURS, window=WINDOW)
    assert result.summary == "no agent can take it: no agent is granted queue 'nobody_serves_this'"
    assert codes(result.agents[0]) == [ex.QUEUE_NOT_SERVED]
    with pytest.raises(ex.TaskNotFound, match="no task instance dag/run/missing"):
        ex.gather(s, ex.TaskRef("dag", "missing", "run"), configured_executors=OURS, window=WINDOW)
    s.close()


def test_gather_running_job_names_its_holder(sessions):
    s = sessions()
    agent = register(s, "runner")
    ti_id = add_task_instance(s, state="running")
    enqueue(s, ti_id)
    leased = store.lease_next(s, agent, lease_ttl=timedelta(minutes=1))
    store.report_job(s, agent.id, leased.id, leased.fencing, JobStatus.RUNNING)
    s.commit()
    result = ex.gather(s, REF, configured_executors=OURS, window=WINDOW)
    assert result.agents[0].holds_job
    assert result.job_status.startswith(f"running on agent runner ({agent.id}) since")
    s.close()
