"""Dead-agent detection in the store, against a real SQLite file (with Airflow's task_instance table).

An agent is online while its last heartbeat is within ``dead_after``. Leased jobs of an offline
agent go back to the queue (fencing bumped: its late reports are refused, its next heartbeat names
them in ``lost``); running jobs are closed only once Airflow has settled their task instance, and
never while the agent is online.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from datetime import timedelta

import pytest

# Before anything imports Airflow: never let the test process touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from sqlalchemy import create_engine, event, insert, select, update  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from executor_plugin import store  # noqa: E402
from executor_plugin.models import JobStatus, job_table, metadata  # noqa: E402

DEAD_AFTER = timedelta(seconds=30)
LEASE_TTL = timedelta(minutes=5)  # longer than every test's offsets: the lease-TTL fallback stays out


@pytest.fixture
def engine(tmp_path):
    from airflow.models import import_all_models
    from airflow.models.taskinstance import TaskInstance

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _busy(conn, _):
        conn.execute("PRAGMA busy_timeout=5000")

    import_all_models()
    metadata.create_all(engine)
    TaskInstance.__table__.create(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def s(engine):
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    yield session
    session.rollback()
    session.close()


def ago(seconds: float):
    return store.utcnow() - timedelta(seconds=seconds)


def add_agent(s, key="a1"):
    token = store.create_token(
        s, token_id=f"tok{key}", secret_hash=store.hash_secret("x"), queues=["default"], region="eu-1",
        name=None, ttl=timedelta(hours=1), max_uses=1,
    )
    agent = store.create_agent(s, agent_id=f"ag_{key}", name=f"vm-{key}", token=token, pubkey_fp=key)
    s.commit()
    return agent


def beat(s, agent, *, at=None, running=()):
    lost = store.record_heartbeat(
        s, agent.id, free_slots=1, total_slots=1, version="t", cert_not_after=None, running=list(running),
        lease_ttl=LEASE_TTL, now=at,
    )
    s.commit()
    return lost


def add_job(s, task="t", *, ti_state="queued", try_number=1):
    """A queued job and its task instance row (state ``ti_state``)."""
    from airflow.models.taskinstance import TaskInstance

    ti_id = uuid.uuid4()
    s.execute(
        insert(TaskInstance.__table__).values(
            id=ti_id, dag_id="d", task_id=task, run_id="r", map_index=-1, try_number=try_number,
            pool="default_pool", state=ti_state,
        )
    )
    job_id = store.enqueue_job(
        s, workload_json="{}", ti_id=str(ti_id), dag_id="d", task_id=task, run_id="r", map_index=-1,
        try_number=try_number, queue="default", priority_weight=1,
    )
    s.commit()
    return job_id, ti_id


def set_ti(s, ti_id, **values):
    from airflow.models.taskinstance import TaskInstance

    table = TaskInstance.__table__
    s.execute(update(table).where(table.c.id == ti_id).values(**values))
    s.commit()


def lease(s, agent, *, at=None):
    job = store.lease_next(s, agent, lease_ttl=LEASE_TTL, now=at)
    assert job is not None
    return job


def row(s, job_id):
    return s.execute(select(job_table).where(job_table.c.id == job_id)).one()


def requeue(s, **kwargs):
    found = store.requeue_leased_of_offline_agents(s, dead_after=DEAD_AFTER, **kwargs)
    s.commit()
    return found


def close(s):
    found = store.close_running_jobs_of_offline_agents(s, dead_after=DEAD_AFTER)
    s.commit()
    return found


# ---------------------------------------------------------------------------------------------------
# Online
# ---------------------------------------------------------------------------------------------------


def test_online_means_a_heartbeat_within_the_window(s):
    agent = add_agent(s)
    assert store.get_agent(s, agent.id).is_online(DEAD_AFTER) is False  # never seen
    assert store.get_agent(s, agent.id).heartbeat_age() is None
    beat(s, agent, at=ago(29))
    fresh = store.get_agent(s, agent.id)
    assert fresh.is_online(DEAD_AFTER) and 29 <= fresh.heartbeat_age() < 60
    beat(s, agent, at=ago(31))
    assert store.get_agent(s, agent.id).is_online(DEAD_AFTER) is False


# ---------------------------------------------------------------------------------------------------
# Leased jobs of offline agents
# ---------------------------------------------------------------------------------------------------


def test_leased_job_of_a_dead_agent_is_requeued_and_its_late_running_report_refused(s):
    agent = add_agent(s)
    job_id, _ = add_job(s)
    beat(s, agent, at=ago(45))
    held = lease(s, agent, at=ago(40))

    [found] = requeue(s)

    assert (found.agent_id, found.agent_name, found.requeued) == (agent.id, "vm-a1", 1)
    assert 40 <= found.silent_for < 100  # since its latest sign of life: the lease, 40 s ago
    r = row(s, job_id)
    assert (r.state, r.agent_id, r.fencing) == (JobStatus.QUEUED, None, held.fencing + 1)
    # The old agent comes back and reports the job started, with the fencing it was leased under.
    with pytest.raises(store.JobNotFound):
        store.report_job(s, agent.id, job_id, held.fencing, JobStatus.RUNNING)
    # Its heartbeat names the job as lost, so it stops it.
    assert beat(s, agent, running=[(job_id, held.fencing)]) == [job_id]
    # It may lease the job again, under a new fencing id; the old one stays refused.
    again = lease(s, agent)
    assert again.id == job_id and again.fencing == held.fencing + 2
    with pytest.raises(store.StaleFencing):
        store.report_job(s, agent.id, job_id, held.fencing, JobStatus.RUNNING)
    assert beat(s, agent, running=[(job_id, held.fencing)]) == [job_id]
    assert beat(s, agent, running=[(job_id, again.fencing)]) == []
    assert requeue(s) == []  # online again


def test_online_agent_keeps_its_leases(s):
    agent = add_agent(s)
    job_id, _ = add_job(s)
    lease(s, agent, at=ago(120))
    beat(s, agent, at=ago(5))
    assert requeue(s) == []
    assert row(s, job_id).state == JobStatus.LEASED


def test_a_lease_younger_than_the_window_is_a_sign_of_life(s):
    # Just started (no heartbeat yet), or its heartbeat was late: the lease itself shows it is alive.
    never_seen, late = add_agent(s, "never"), add_agent(s, "late")
    add_job(s, "one")
    add_job(s, "two")
    beat(s, late, at=ago(90))
    lease(s, never_seen, at=ago(3))
    lease(s, late, at=ago(3))
    assert requeue(s) == []
    # The same leases 31 s later: both agents are offline.
    found = requeue(s, now=store.utcnow() + timedelta(seconds=31))
    assert sorted((f.agent_id, f.requeued) for f in found) == [(late.id, 1), (never_seen.id, 1)]


def test_only_leased_jobs_are_requeued_and_one_line_per_agent(s):
    dead, alive = add_agent(s, "dead"), add_agent(s, "alive")
    for i in range(4):
        add_job(s, f"t{i}")
    beat(s, dead, at=ago(60))
    leased = [lease(s, dead, at=ago(50)) for _ in range(3)]
    started = leased[0]
    store.report_job(s, dead.id, started.id, started.fencing, JobStatus.RUNNING, now=ago(45))
    s.commit()
    beat(s, alive)
    mine = lease(s, alive, at=ago(50))

    [found] = requeue(s)

    assert (found.agent_id, found.requeued) == (dead.id, 2)
    assert row(s, started.id).state == JobStatus.RUNNING  # started: left to Airflow
    assert row(s, mine.id).state == JobStatus.LEASED


def test_a_heartbeat_landing_between_scan_and_update_wins(engine, s):
    agent = add_agent(s)
    job_id, _ = add_job(s)
    beat(s, agent, at=ago(60))
    lease(s, agent, at=ago(50))
    other = sessionmaker(bind=engine)()
    fired = []

    @event.listens_for(engine, "before_cursor_execute")
    def _heartbeat_first(conn, cursor, statement, *args):
        # The agent's heartbeat commits after the sweep's scan, just before its UPDATE.
        if statement.lstrip().upper().startswith("UPDATE EDGE_AGENT_JOB") and not fired:
            fired.append(True)
            beat(other, agent)

    try:
        assert requeue(s) == []
    finally:
        event.remove(engine, "before_cursor_execute", _heartbeat_first)
        other.close()
    assert fired and row(s, job_id).state == JobStatus.LEASED


def test_revoked_agents_leases_went_back_already_and_drained_ones_are_swept_too(s):
    agent = add_agent(s)
    job_id, _ = add_job(s)
    beat(s, agent, at=ago(60))
    lease(s, agent, at=ago(50))
    store.drain_agent(s, agent.id)
    s.commit()
    [found] = requeue(s)
    assert found.requeued == 1 and row(s, job_id).state == JobStatus.QUEUED


# ---------------------------------------------------------------------------------------------------
# Running jobs of offline agents
# ---------------------------------------------------------------------------------------------------


def started_job(s, agent, task="t", *, started=40):
    """A job the agent leased and confirmed started ``started`` seconds ago; its TI is RUNNING."""
    _job_id, ti_id = add_job(s, task)
    held = lease(s, agent, at=ago(started + 1))
    store.report_job(s, agent.id, held.id, held.fencing, JobStatus.RUNNING, now=ago(started))
    s.commit()
    set_ti(s, ti_id, state="running")
    return held, ti_id


def test_running_job_of_a_dead_agent_is_left_alone_while_airflow_still_runs_its_ti(s):
    agent = add_agent(s)
    beat(s, agent, at=ago(60))
    held, ti_id = started_job(s, agent)
    assert close(s) == []
    set_ti(s, ti_id, state="queued")  # cut off before the task reached Airflow: may still run
    assert close(s) == []
    set_ti(s, ti_id, state="restarting")  # Airflow's heartbeat timeout settles it
    assert close(s) == []
    assert row(s, held.id).state == JobStatus.RUNNING


@pytest.mark.parametrize(
    ("ti_change", "job_state", "why"),
    [
        ({"state": "failed"}, JobStatus.FAILED, "settled the task instance as failed"),
        ({"state": "up_for_retry"}, JobStatus.FAILED, "settled the task instance as up_for_retry"),
        ({"state": "success"}, JobStatus.SUCCESS, "settled the task instance as success"),
        ({"try_number": 2, "state": "queued"}, JobStatus.FAILED, "on try 2 now"),
        (None, JobStatus.FAILED, "moved on to another try"),  # new try = new TI id; or run deleted
    ],
)
def test_running_job_of_a_dead_agent_is_closed_once_airflow_settled_its_ti(s, ti_change, job_state, why):
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import delete

    agent = add_agent(s)
    beat(s, agent, at=ago(60))
    held, ti_id = started_job(s, agent)
    if ti_change is None:
        table = TaskInstance.__table__
        s.execute(delete(table).where(table.c.id == ti_id))
        s.commit()
    else:
        set_ti(s, ti_id, **ti_change)

    [closed] = close(s)

    r = row(s, held.id)
    assert closed.job.id == held.id and closed.agent_name == "vm-a1"
    assert (r.state, r.reported_state) == (job_state, job_state)  # closed without a scheduler event
    assert r.fencing == held.fencing + 1 and r.finished_at is not None
    assert r.reason.startswith(f"agent vm-a1 ({agent.id}) went offline; ") and why in r.reason
    assert store.pending_events(s) == []
    assert store.jobs_for_keys(s, [closed.job.key_tuple]) == []  # the executor forgets the key
    # The agent comes back: its report is refused and its heartbeat names the job lost.
    with pytest.raises(store.StaleFencing):
        store.report_job(s, agent.id, held.id, held.fencing, JobStatus.SUCCESS, exit_code=0)
    assert beat(s, agent, running=[(held.id, held.fencing)]) == [held.id]
    assert close(s) == []


def test_running_job_of_an_online_agent_whose_ti_succeeded_is_not_closed(s):
    agent = add_agent(s)
    held, ti_id = started_job(s, agent, started=600)
    beat(s, agent)  # online
    set_ti(s, ti_id, state="success")  # the task told Airflow; the agent's own report is on its way

    assert close(s) == []

    store.report_job(s, agent.id, held.id, held.fencing, JobStatus.SUCCESS, exit_code=0)
    s.commit()
    assert [job.state for job in store.pending_events(s)] == [JobStatus.SUCCESS]


def test_a_job_started_within_the_window_is_not_closed(s):
    # The RUNNING report is a sign of life, even when the agent's heartbeats lag.
    agent = add_agent(s)
    beat(s, agent, at=ago(60))
    held, ti_id = started_job(s, agent, started=2)
    set_ti(s, ti_id, state="success")
    assert close(s) == []
    assert row(s, held.id).state == JobStatus.RUNNING
