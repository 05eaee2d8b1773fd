"""The store on a real PostgreSQL: queue isolation, fencing, and leasing/registration under concurrency.

SQLite serialises every writer, so tests/unit/test_store.py cannot show that concurrent leasers on
PostgreSQL (``FOR UPDATE SKIP LOCKED`` + compare-and-set) never hand one job to two agents and never
strand one. Here each leaser is its own connection: threads in this process, and separate
processes (spawned, so each has its own engine and pool).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from executor_plugin import store
from executor_plugin.models import AgentStatus, JobStatus, agent_table, job_table, metadata, token_table

LEASE_TTL = timedelta(seconds=300)
JOIN_TIMEOUT = 120.0


def make_engine(url: str, pool_size: int = 5) -> Engine:
    return create_engine(url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url, pool_size=20)
    metadata.create_all(eng)
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
    # Hand every connection back before the engine is disposed: one still checked out would be
    # reset at garbage collection, after the cluster is gone, and log a spurious error.
    for session in opened:
        session.close()


def add_jobs(session: Session, count: int, queue: str = "default", prefix: str = "t") -> list[str]:
    ids = [
        store.enqueue_job(
            session, workload_json="{}", ti_id=f"00000000-0000-0000-0000-{i:012d}", dag_id="d",
            task_id=f"{prefix}{i}", run_id="r", map_index=-1, try_number=1, queue=queue, priority_weight=1,
        )
        for i in range(count)
    ]
    session.commit()
    return ids


def add_agent(session: Session, key: str, queues: Sequence[str] = ("default",)) -> store.Agent:
    token = store.create_token(
        session, token_id=f"tok_{key}", secret_hash=store.hash_secret("s"), queues=queues, region="eu-1",
        name=None, ttl=timedelta(hours=1), max_uses=1,
    )
    agent = store.create_agent(session, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=f"fp_{key}")
    session.commit()
    return agent


def run_threads(target: Callable[[int], None], count: int) -> None:
    """Run ``target(i)`` in ``count`` threads started together; re-raise the first failure."""
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            barrier.wait(JOIN_TIMEOUT)
            target(i)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=body, args=(i,), name=f"pg-worker-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not [t.name for t in threads if t.is_alive()], "workers still running"
    assert not errors, errors[0]


def lease_until_empty(session: Session, agent: store.Agent) -> list[tuple[str, str, int]]:
    """Lease until no job is queued; returns (job id, agent id, fencing) per lease.

    ``lease_next`` may return None while jobs remain (all candidates locked by other leasers, who
    then release the ones they did not take), so only an empty queue ends the loop.
    """
    got: list[tuple[str, str, int]] = []
    while True:
        job = store.lease_next(session, agent, lease_ttl=LEASE_TTL)
        if job is not None:
            assert job.agent_id == agent.id and job.state == JobStatus.LEASED
            got.append((job.id, job.agent_id, job.fencing))
        elif not store.queued_exists(session, agent.queues):
            session.commit()
            return got


def assert_each_leased_once(engine: Engine, job_ids: Sequence[str], leases: Sequence[tuple[str, str, int]]) -> None:
    counts = Counter(job_id for job_id, _, _ in leases)
    assert [j for j, n in counts.items() if n > 1] == [], "a job was leased twice"
    assert set(counts) == set(job_ids), f"{len(set(job_ids) - set(counts))} jobs never leased"
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(job_table.c.id, job_table.c.state, job_table.c.agent_id,
                                                               job_table.c.fencing))}
    for job_id, agent_id, fencing in leases:
        row = rows[job_id]
        assert (row.state, row.agent_id, row.fencing) == (JobStatus.LEASED, agent_id, fencing), row
        assert fencing == 1, "a job's first lease must carry fencing 1"


# ---------------------------------------------------------------------------------------------------


def test_lease_is_isolated_by_queue(session_factory):
    s = session_factory()
    eu = set(add_jobs(s, 3, queue="eu_pii", prefix="eu"))
    default = set(add_jobs(s, 3, queue="default", prefix="df"))
    eu_agent = add_agent(s, "eu", queues=("eu_pii",))
    default_agent = add_agent(s, "df", queues=("default",))

    got_eu = {j for j, _, _ in lease_until_empty(s, eu_agent)}
    assert got_eu == eu
    assert store.queued_exists(s, ("default",)) and not store.queued_exists(s, ("eu_pii",))
    assert {j for j, _, _ in lease_until_empty(s, default_agent)} == default
    assert store.running_job_counts(s) == {eu_agent.id: 3, default_agent.id: 3}


def test_inactive_agent_leases_nothing(session_factory):
    s = session_factory()
    add_jobs(s, 1)
    agent = add_agent(s, "drain")
    assert store.lease_next(s, replace(agent, state=AgentStatus.DRAINING), lease_ttl=LEASE_TTL) is None
    assert store.queued_exists(s, ("default",))


def test_fencing_across_requeue_heartbeat_and_reports(session_factory):
    s = session_factory()
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    (job_id,) = add_jobs(s, 1)
    first, second = add_agent(s, "first"), add_agent(s, "second")

    lease = store.lease_next(s, first, lease_ttl=timedelta(seconds=30), now=t0)
    assert lease is not None and lease.fencing == 1 and lease.lease_expires_at == t0 + timedelta(seconds=30)
    assert lease.lease_expires_at.tzinfo is not None  # timestamptz round trip

    # The lease lapses before the agent confirmed the start: back to the queue, fencing bumped.
    assert store.requeue_expired_leases(s, now=t0 + timedelta(seconds=31)) == 1
    s.commit()
    with pytest.raises(store.JobNotFound):  # no longer first's job at all
        store.report_job(s, first.id, job_id, 1, JobStatus.RUNNING)

    again = store.lease_next(s, second, lease_ttl=LEASE_TTL)
    assert again is not None and again.id == job_id and again.fencing == 3
    with pytest.raises(store.StaleFencing):
        store.report_job(s, second.id, job_id, 2, JobStatus.RUNNING)
    # A heartbeat with an old fencing id does not renew; the agent is told the job is gone.
    lost = store.record_heartbeat(s, second.id, free_slots=1, total_slots=2, version="t", cert_not_after=None,
                                  running=[(job_id, 1)], lease_ttl=LEASE_TTL)
    assert lost == [job_id]
    assert store.record_heartbeat(s, second.id, free_slots=1, total_slots=2, version="t", cert_not_after=None,
                                  running=[(job_id, 3)], lease_ttl=LEASE_TTL) == []
    s.commit()

    running = store.report_job(s, second.id, job_id, 3, JobStatus.RUNNING)
    s.commit()
    assert running.state == JobStatus.RUNNING and running.started_at is not None
    assert [j.id for j in store.pending_events(s)] == [job_id]
    store.mark_reported(s, job_id, JobStatus.RUNNING)
    s.commit()
    done = store.report_job(s, second.id, job_id, 3, JobStatus.SUCCESS, exit_code=0)
    s.commit()
    assert done.state == JobStatus.SUCCESS and done.exit_code == 0
    assert [j.key_tuple for j in store.jobs_for_keys(s, [done.key_tuple])] == [done.key_tuple]  # unreported
    store.mark_reported(s, job_id, JobStatus.SUCCESS)
    s.commit()
    assert store.jobs_for_keys(s, [done.key_tuple]) == []
    assert store.purge_reported(s, older_than=done.finished_at + timedelta(seconds=1)) == 1
    s.commit()


def test_sixteen_threads_lease_each_job_exactly_once(engine, session_factory):
    s = session_factory()
    job_ids = add_jobs(s, 200)
    agents = [add_agent(s, f"a{i}") for i in range(4)]
    s.close()
    leases: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with session_factory() as sess:
            got = lease_until_empty(sess, agents[i % len(agents)])
        with lock:
            leases.extend(got)

    run_threads(worker, 16)
    assert_each_leased_once(engine, job_ids, leases)
    # Every leaser took part: the jobs were spread, not drained by one connection holding a lock.
    assert len({agent_id for _, agent_id, _ in leases}) == len(agents)


def _process_leaser(url: str, agent_ids: list[str], threads: int, start: "multiprocessing.synchronize.Barrier",
                    results: "multiprocessing.Queue") -> None:
    """Body of a spawned leasing process: its own engine, ``threads`` leasers, results to ``results``."""
    eng = make_engine(url, pool_size=threads)
    factory = sessionmaker(bind=eng, expire_on_commit=False)
    try:
        with factory() as sess:
            agents = [store.get_agent(sess, agent_id) for agent_id in agent_ids]
        leases: list[tuple[str, str, int]] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            with factory() as sess2:
                got = lease_until_empty(sess2, agents[i % len(agents)])
            with lock:
                leases.extend(got)

        start.wait(JOIN_TIMEOUT)  # both processes begin leasing together
        run_threads(worker, threads)
        results.put(("ok", leases))
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        eng.dispose()


def test_two_processes_lease_each_job_exactly_once(engine, session_factory, pg_url):
    s = session_factory()
    job_ids = add_jobs(s, 200)
    agents = [add_agent(s, f"p{i}") for i in range(4)]
    s.close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_leaser, args=(pg_url, [a.id for a in agents[n::2]], 4, start, results),
                    name=f"pg-leaser-{n}")
        for n in range(2)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=JOIN_TIMEOUT) for _ in procs]
    except queue.Empty:
        outcomes = []
    finally:
        for p in procs:
            p.join(JOIN_TIMEOUT if outcomes else 5)
            if p.is_alive():
                p.kill()
                p.join()
    assert len(outcomes) == 2, "a leasing process did not report"
    errors = [detail for status, detail in outcomes if status != "ok"]
    assert not errors, errors[0]
    per_process = [detail for _, detail in outcomes]
    assert_each_leased_once(engine, job_ids, [lease for leases in per_process for lease in leases])
    assert all(per_process), "one process leased nothing: the processes did not overlap"


@pytest.mark.parametrize("max_uses", [1, 3])
def test_concurrent_registrations_use_a_token_at_most_max_uses_times(session_factory, max_uses):
    s = session_factory()
    store.create_token(s, token_id="tok_shared", secret_hash=store.hash_secret("secret"), queues=("default",),
                       region="eu-1", name=None, ttl=timedelta(hours=1), max_uses=max_uses)
    s.commit()
    s.close()
    created: list[str] = []
    rejected: list[str] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        with session_factory() as sess:
            try:
                token, existing = store.redeem_token(sess, token_id="tok_shared", secret="secret",
                                                     pubkey_fp=f"key{i}")
                assert existing is None
                agent = store.create_agent(sess, agent_id=f"ag_{i}", name=f"n{i}", token=token,
                                           pubkey_fp=f"key{i}")
                sess.commit()
            except store.TokenRejected as exc:
                sess.rollback()
                with lock:
                    rejected.append(exc.reason)
            else:
                with lock:
                    created.append(agent.id)

    run_threads(register, 8)
    assert len(created) == max_uses and len(rejected) == 8 - max_uses
    assert all("already used" in reason for reason in rejected)
    with session_factory() as sess:
        assert sess.execute(select(func.count()).select_from(agent_table)).scalar() == max_uses
        assert sess.execute(select(token_table.c.uses)).scalar() == max_uses
        # A lost response retried with the winner's key still finds its agent (idempotent).
        winner = created[0]
        _, agent = store.redeem_token(sess, token_id="tok_shared", secret="secret",
                                      pubkey_fp=f"key{winner.removeprefix('ag_')}")
        assert agent is not None and agent.id == winner
