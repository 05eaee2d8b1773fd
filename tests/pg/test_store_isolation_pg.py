"""Leasing with queue policies and refusals on a real PostgreSQL: the candidate scan there adds
``FOR UPDATE SKIP LOCKED`` to a query with a correlated NOT EXISTS (refusals), which SQLite never
runs; concurrent leasers must still never share a job nor get one they refused."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from executor_plugin import store
from executor_plugin.models import JobStatus, metadata

TTL = timedelta(seconds=300)


@pytest.fixture
def engine(pg_new_database, request) -> Iterator[Engine]:
    eng = create_engine(pg_new_database(request.node.name), pool_size=10, max_overflow=4)
    metadata.create_all(eng)
    yield eng
    eng.dispose()


def agent(s: Session, key: str, region: str) -> store.Agent:
    token = store.create_token(
        s, token_id=f"t{key}", secret_hash=store.hash_secret("s"), queues=["eu_pii"], region=region, name=None,
        ttl=timedelta(hours=1), max_uses=1,
    )
    created = store.create_agent(s, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=key)
    s.commit()
    return created


def test_policies_and_refusals_under_concurrent_leasing(engine):
    maker = sessionmaker(bind=engine, expire_on_commit=False)
    with maker() as s:
        agents = [agent(s, f"eu{i}", "eu-west-1") for i in range(4)] + [agent(s, "us", "us-east-1")]
        store.set_queue_policy(s, "eu_pii", regions=["eu-*"])
        ids = [
            store.enqueue_job(
                s, workload_json="{}", ti_id=f"00000000-0000-0000-0000-{i:012d}", dag_id="d", task_id=f"t{i}",
                run_id="r", map_index=-1, try_number=1, queue="eu_pii", priority_weight=1,
            )
            for i in range(40)
        ]
        s.commit()
        # ag_eu0 refuses the first job: it must never come back to it.
        first = store.lease_next(s, agents[0], lease_ttl=TTL)
        store.refuse_job(s, agents[0].id, first.id, first.fencing, reason="local policy")
        s.commit()

    got: list[tuple[str, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(agents))

    def lease_all(a: store.Agent) -> None:
        with maker() as session:
            barrier.wait(60)
            while True:
                job = store.lease_next(session, a, lease_ttl=TTL)
                if job is not None:
                    with lock:
                        got.append((job.id, a.id))
                # None while work remains: every candidate was locked by another leaser; try again.
                elif not store.queued_exists(session, store.eligible_queues(session, a), refused_by=a.id):
                    session.commit()
                    return

    threads = [threading.Thread(target=lease_all, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()]
    counts = Counter(job_id for job_id, _ in got)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    holders = dict(got)
    assert "ag_us" not in holders.values()
    assert holders[first.id] != agents[0].id
    with maker() as s:
        assert not store.queued_exists(s, ("eu_pii",))
        assert store.lease_next(s, agents[-1], lease_ttl=TTL) is None
        assert {store.job_for_agent(s, holder, job_id, 3 if job_id == first.id else 1).state
                for job_id, holder in got} == {JobStatus.LEASED}
