"""Dead-agent sweeps on a real PostgreSQL: two schedulers sweeping at once, SKIP LOCKED, and guards.

``requeue_leased_of_offline_agents`` and ``close_running_jobs_of_offline_agents`` scan with
``FOR UPDATE OF edge_agent_job SKIP LOCKED`` on PostgreSQL, so two schedulers sweeping together take
disjoint rows (each job handed back exactly once, fencing bumped exactly once) and never wait on
each other; the UPDATE re-checks the agent, so a heartbeat committed after the scan wins.
Airflow's task_instance table is stood in for by the three columns the sweep reads (the real one
has foreign keys into tables this database does not have).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Uuid, event, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from executor_plugin import store
from executor_plugin.models import JobStatus, job_table, metadata

from test_store_pg import add_agent, make_engine, run_threads

DEAD_AFTER = timedelta(seconds=30)
LEASE_TTL = timedelta(minutes=10)

task_instance = Table(
    "task_instance", MetaData(),
    Column("id", Uuid, primary_key=True), Column("state", String(20)), Column("try_number", Integer),
)


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url, pool_size=10)
    metadata.create_all(eng)
    task_instance.create(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[Callable[[], Session]]:
    maker = sessionmaker(bind=engine, expire_on_commit=False)
    opened: list[Session] = []

    def factory() -> Session:
        session = maker()
        opened.append(session)
        return session

    yield factory
    for session in opened:
        session.close()


def ago(seconds: float):
    return store.utcnow() - timedelta(seconds=seconds)


def beat(s: Session, agent: store.Agent, *, at=None) -> None:
    store.record_heartbeat(s, agent.id, free_slots=1, total_slots=1, version="t", cert_not_after=None, running=[],
                           lease_ttl=LEASE_TTL, now=at)
    s.commit()


def add_jobs(s: Session, count: int, *, ti_state: str = "queued") -> list[tuple[str, uuid.UUID]]:
    made = []
    for i in range(count):
        ti_id = uuid.uuid4()
        s.execute(insert(task_instance).values(id=ti_id, state=ti_state, try_number=1))
        job_id = store.enqueue_job(
            s, workload_json="{}", ti_id=str(ti_id), dag_id="d", task_id=f"t{i}", run_id="r", map_index=-1,
            try_number=1, queue="default", priority_weight=1,
        )
        made.append((job_id, ti_id))
    s.commit()
    return made


def lease_all(s: Session, agents: list[store.Agent], count: int, *, at) -> None:
    for i in range(count):
        assert store.lease_next(s, agents[i % len(agents)], lease_ttl=LEASE_TTL, now=at) is not None


def fencings(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        return {r.id: (r.state, r.fencing) for r in conn.execute(select(job_table.c.id, job_table.c.state,
                                                                          job_table.c.fencing))}


def test_two_schedulers_sweeping_together_requeue_each_job_exactly_once(engine, session_factory):
    s = session_factory()
    add_jobs(s, 200)
    dead = [add_agent(s, f"dead{i}") for i in range(4)]
    for agent in dead:
        beat(s, agent, at=ago(120))
    lease_all(s, dead, 200, at=ago(100))
    s.close()
    counts: list[int] = []
    lock = threading.Lock()

    def sweeper(_i: int) -> None:
        with session_factory() as sess:
            found = store.requeue_leased_of_offline_agents(sess, dead_after=DEAD_AFTER)
            sess.commit()
        with lock:
            counts.extend(f.requeued for f in found)

    run_threads(sweeper, 4)
    assert sum(counts) == 200
    # Leased under fencing 1, handed back once: 2. A second hand-back would have made it 3.
    assert set(fencings(engine).values()) == {(JobStatus.QUEUED, 2)}


def test_a_sweep_skips_rows_another_scheduler_holds_instead_of_waiting(engine, session_factory):
    s = session_factory()
    add_jobs(s, 5)
    agent = add_agent(s, "dead")
    beat(s, agent, at=ago(120))
    lease_all(s, [agent], 5, at=ago(100))
    first, second = session_factory(), session_factory()
    [found] = store.requeue_leased_of_offline_agents(first, dead_after=DEAD_AFTER)  # not committed yet
    assert found.requeued == 5
    # Would raise instead of returning if the second sweep waited on the first one's row locks.
    second.execute(text("SET LOCAL lock_timeout = '5s'"))
    assert store.requeue_leased_of_offline_agents(second, dead_after=DEAD_AFTER) == []
    second.commit()
    first.commit()
    assert store.requeue_leased_of_offline_agents(second, dead_after=DEAD_AFTER) == []
    assert set(fencings(engine).values()) == {(JobStatus.QUEUED, 2)}


def test_a_heartbeat_committed_after_the_scan_keeps_the_leases(engine, session_factory):
    s = session_factory()
    add_jobs(s, 3)
    agent = add_agent(s, "late")
    beat(s, agent, at=ago(120))
    lease_all(s, [agent], 3, at=ago(100))
    fired: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def heartbeat_first(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE EDGE_AGENT_JOB") and not fired:
            fired.append(True)
            with session_factory() as other:
                beat(other, agent)

    sweeper = session_factory()
    try:
        assert store.requeue_leased_of_offline_agents(sweeper, dead_after=DEAD_AFTER) == []
        sweeper.commit()
    finally:
        event.remove(engine, "before_cursor_execute", heartbeat_first)
    assert fired
    assert set(fencings(engine).values()) == {(JobStatus.LEASED, 1)}


def test_running_jobs_of_dead_agents_close_once_settled_and_exactly_once(engine, session_factory):
    s = session_factory()
    made = add_jobs(s, 40, ti_state="running")
    dead, alive = add_agent(s, "dead"), add_agent(s, "alive")
    beat(s, dead, at=ago(120))
    lease_all(s, [dead, alive], 40, at=ago(100))
    held = s.execute(select(job_table.c.id, job_table.c.agent_id, job_table.c.fencing)).all()
    for job_id, agent_id, fencing in held:
        store.report_job(s, agent_id, job_id, fencing, JobStatus.RUNNING, now=ago(90))
    s.commit()
    beat(s, alive)
    # Airflow settled every try (task heartbeat timeout), but only the dead agent's jobs may close.
    s.execute(task_instance.update().values(state="failed"))
    # One of the dead agent's tries is still running in Airflow: it stays open.
    dead_jobs = sorted(job_id for job_id, agent_id, _ in held if agent_id == dead.id)
    ti_of = dict(made)
    s.execute(task_instance.update().where(task_instance.c.id == ti_of[dead_jobs[0]]).values(state="running"))
    s.commit()
    closed: list[str] = []
    lock = threading.Lock()

    def sweeper(_i: int) -> None:
        with session_factory() as sess:
            found = store.close_running_jobs_of_offline_agents(sess, dead_after=DEAD_AFTER)
            sess.commit()
        with lock:
            closed.extend(c.job.id for c in found)

    run_threads(sweeper, 3)
    assert sorted(closed) == dead_jobs[1:]  # each closed once, by one sweeper
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(job_table))}
    for job_id in dead_jobs[1:]:
        assert (rows[job_id].state, rows[job_id].reported_state, rows[job_id].fencing) == (
            JobStatus.FAILED, JobStatus.FAILED, 2,
        )
    assert rows[dead_jobs[0]].state == JobStatus.RUNNING
    assert {rows[j].state for j, agent_id, _ in held if agent_id == alive.id} == {JobStatus.RUNNING}
