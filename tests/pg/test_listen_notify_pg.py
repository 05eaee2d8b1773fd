"""Enqueue notifications on a real PostgreSQL: ``store.enqueue_job`` NOTIFYs at commit, the
gateway's listener hears it, reconnects after losing its connection, and wakes the right waiting
lease request without any poll (the notifier's polls are set to minutes here)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session

from executor_plugin import store
from executor_plugin.gateway import notify, pg_listen
from executor_plugin.gateway.job_channel import CHANNEL
from executor_plugin.gateway.notify import LeaseNotifier
from executor_plugin.gateway.pg_listen import QueueListener, connect_kwargs_for
from executor_plugin.gateway.wait_probe import (
    Snapshot,
    holder_views,
    queued_work,
    snapshot,
)
from executor_plugin.models import metadata

WAIT = 60.0  # generous: the machine is shared; nothing below asserts on durations


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    eng = create_engine(pg_url, pool_size=4, max_overflow=2)
    metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def kwargs(pg_url: str) -> dict:
    return connect_kwargs_for(make_url(pg_url))


def _enqueue(session: Session, queue: str, task: str) -> str:
    return store.enqueue_job(
        session, workload_json="{}", ti_id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id=task,
        run_id="r", map_index=-1, try_number=1, queue=queue, priority_weight=1,
    )


def _heard(conn: psycopg.Connection, quiet: float = 1.0) -> list[str]:
    """Payloads delivered to ``conn`` until none came for ``quiet`` seconds."""
    return [note.payload for note in conn.notifies(timeout=quiet)]


def test_enqueue_notifies_its_queue_at_commit_only(engine, kwargs):
    with psycopg.connect(autocommit=True, **kwargs) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with Session(engine) as s:
            _enqueue(s, "a", "t1")
            _enqueue(s, "a", "t2")  # the same queue twice in one transaction: delivered once
            _enqueue(s, "b", "t3")
            assert _heard(listener) == []  # nothing before the commit
            s.commit()
        assert sorted(_heard(listener)) == ["a", "b"]
        with Session(engine) as s:
            _enqueue(s, "c", "t4")
            s.rollback()
        assert _heard(listener) == []  # a rolled-back enqueue announces nothing


def _terminate_listener(engine: Engine) -> int:
    with psycopg.connect(autocommit=True, **connect_kwargs_for(engine.url)) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (pg_listen.APPLICATION_NAME,),
        ).fetchall()
    return len(rows)


def test_listener_hears_notifications_and_reconnects_after_losing_its_connection(engine, kwargs, monkeypatch):
    monkeypatch.setattr(pg_listen, "BACKOFF_FIRST_SECONDS", 0.05)

    async def main() -> None:
        heard: asyncio.Queue[str] = asyncio.Queue()
        states: asyncio.Queue[bool] = asyncio.Queue()
        listener = QueueListener(kwargs, heard.put_nowait, states.put_nowait, where="test")
        listener.start()
        assert await asyncio.wait_for(states.get(), WAIT) is True

        def enqueue(queue: str) -> None:
            with Session(engine) as s:
                _enqueue(s, queue, f"t-{queue}")
                s.commit()

        await asyncio.to_thread(enqueue, "first")
        assert await asyncio.wait_for(heard.get(), WAIT) == "first"

        assert await asyncio.to_thread(_terminate_listener, engine) == 1
        assert await asyncio.wait_for(states.get(), WAIT) is False
        assert await asyncio.wait_for(states.get(), WAIT) is True  # reconnected and listening again
        await asyncio.to_thread(enqueue, "second")
        assert await asyncio.wait_for(heard.get(), WAIT) == "second"

        await listener.aclose()
        assert await asyncio.wait_for(states.get(), WAIT) is False
        assert await asyncio.to_thread(_terminate_listener, engine) == 0  # its connection is closed

    asyncio.run(main())


def _probe_for(engine: Engine):
    def probe(agent_ids: Sequence[str] | None, work: bool) -> Snapshot:
        with Session(engine) as s:
            return snapshot(s, agent_ids, work)

    return probe


def _agent(session: Session, key: str, queues: list[str]) -> store.Agent:
    token = store.create_token(
        session, token_id=f"tok{key}", secret_hash=store.hash_secret("s"), queues=queues, region="eu-1",
        name=None, ttl=timedelta(hours=1), max_uses=1,
    )
    agent = store.create_agent(session, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=key)
    session.commit()
    return agent


def test_an_enqueue_wakes_the_waiting_poll_of_its_queue_without_polling(engine, kwargs, monkeypatch):
    # Polls every five minutes: within this test, only a notification can wake a waiter.
    monkeypatch.setattr(notify, "AGENT_CHECK_SECONDS", 300.0)

    async def main() -> None:
        with Session(engine) as s:
            a, b = _agent(s, "a", ["qa"]), _agent(s, "b", ["qb"])

        up = asyncio.Event()

        def listener_factory(on_queue, on_listening):
            def listening(state: bool) -> None:
                on_listening(state)
                if state:
                    up.set()

            return QueueListener(kwargs, on_queue, listening, where="test")

        notifier = LeaseNotifier(poll_interval=300.0, probe=_probe_for(engine), listener=listener_factory)
        wait_a = asyncio.ensure_future(notifier.wait(a.id, ("qa",), WAIT))
        wait_b = asyncio.ensure_future(notifier.wait(b.id, ("qb",), 3.0))
        await asyncio.wait_for(up.wait(), WAIT)
        assert notifier.listening

        session = Session(engine)
        await asyncio.to_thread(_enqueue, session, "qa", "t1")
        await asyncio.sleep(0.5)
        assert not wait_a.done()  # not committed yet: nothing to wake for
        await asyncio.to_thread(session.commit)
        session.close()
        assert await wait_a is True
        assert await wait_b is False  # another queue's job does not wake it
        await notifier.aclose()
        assert await asyncio.to_thread(_terminate_listener, engine) == 0

    asyncio.run(asyncio.wait_for(main(), 2 * WAIT))


def test_a_server_it_cannot_log_in_to_is_retried_and_reported_once_without_the_password(kwargs, caplog):
    states: list[bool] = []
    listener = QueueListener({**kwargs, "user": "nobody", "password": "s3cret-pw"}, lambda q: None, states.append)

    async def main() -> None:
        listener.start()
        while not any(r.levelname == "WARNING" for r in caplog.records):
            await asyncio.sleep(0.05)
        await listener.aclose()

    with caplog.at_level("INFO", logger=pg_listen.__name__):
        asyncio.run(asyncio.wait_for(main(), WAIT))
    assert states == []  # never listening, so never reported up (nor down)
    assert "s3cret-pw" not in caplog.text
    assert sum(r.levelname == "WARNING" for r in caplog.records) == 1


def test_the_snapshot_reads_on_postgresql(engine):
    # The agents' ids go to PostgreSQL as one array parameter, not a 1,000-item IN list.
    with Session(engine) as s:
        agents = [_agent(s, str(i), [f"q{i}"]) for i in range(3)]
        store.drain_agent(s, agents[2].id)
        _enqueue(s, "q0", "t1")
        s.commit()
        views = holder_views(s, [a.id for a in agents] + ["ag_gone"])
        work = queued_work(s)
    assert {agent_id: (v.state, sorted(v.eligible)) for agent_id, v in views.items()} == {
        agents[0].id: ("active", ["q0"]),
        agents[1].id: ("active", ["q1"]),
        agents[2].id: ("draining", []),
    }
    assert work.queued == {"q0": 1} and work.refused == {}
