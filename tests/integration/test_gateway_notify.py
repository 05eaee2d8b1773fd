"""The lease notifier on a real event loop, with its database reads replaced by a recording fake and
its PostgreSQL listener by a fake that hands the test its callbacks (the gateway tests exercise the
real reads against SQLite, tests/pg the real listener; these pin the waking and polling rules)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest

from executor_plugin.gateway import notify
from executor_plugin.gateway.notify import LeaseNotifier
from executor_plugin.gateway.wait_probe import HolderView, QueuedWork, Snapshot
from executor_plugin.models import AgentStatus

POLL = 0.05
ACTIVE = AgentStatus.ACTIVE


@pytest.fixture(autouse=True)
def quick_agent_checks(monkeypatch):
    monkeypatch.setattr(notify, "AGENT_CHECK_SECONDS", 0.1)


class FakeDb:
    """Stands in for ``wait_probe.read_snapshot``; records every read.

    ``queued``: queue -> jobs; ``refused``: (agent, queue) -> jobs that agent refused; ``agents``:
    agent id -> its row as read now (None or absent: the row is gone).
    """

    def __init__(self) -> None:
        self.queued: dict[str, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self.agents: dict[str, HolderView | None] = {}
        self.calls: list[tuple[list[str] | None, bool]] = []
        self.fail = False
        #: Empty the queues once a read has seen their jobs (as if the woken polls leased them).
        self.lease_on_read = False
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def grant(self, agent_id: str, queues: Sequence[str]) -> None:
        self.agents[agent_id] = HolderView(ACTIVE, frozenset(queues))

    def __call__(self, agent_ids: Sequence[str] | None, work: bool) -> Snapshot:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append((list(agent_ids) if agent_ids is not None else None, work))
            if self.fail:
                raise RuntimeError("database is down")
            holders = None
            if agent_ids is not None:
                holders = {i: view for i in agent_ids if (view := self.agents.get(i)) is not None}
            queued = QueuedWork(dict(self.queued), dict(self.refused)) if work else None
            snapshot = Snapshot(work=queued, holders=holders)
            if work and self.lease_on_read:
                self.queued.clear()
            return snapshot
        finally:
            with self._lock:
                self.active -= 1

    def work_reads(self) -> int:
        return sum(1 for _, work in self.calls if work)


def hold(notifier: LeaseNotifier, db: FakeDb, agent_id: str, queues: Sequence[str], timeout: float, **kwargs):
    """A waiter of an active agent granted ``queues`` (unless the test set its row already)."""
    if agent_id not in db.agents:
        db.grant(agent_id, queues)
    return asyncio.ensure_future(notifier.wait(agent_id, queues, timeout, **kwargs))


class FakeListener:
    def __init__(self) -> None:
        self.on_queue: Callable[[str], None] | None = None
        self.on_listening: Callable[[bool], None] | None = None
        self.started = 0
        self.closed = 0
        self.made = 0

    def factory(self, on_queue, on_listening):
        self.made += 1
        self.on_queue, self.on_listening = on_queue, on_listening
        return self

    def start(self) -> None:
        self.started += 1

    async def aclose(self) -> None:
        self.closed += 1


def make(db: FakeDb, *, poll: float = POLL, listener: FakeListener | None = None) -> LeaseNotifier:
    return LeaseNotifier(poll_interval=poll, probe=db, listener=listener.factory if listener else None)


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Yield to the loop until ``predicate`` holds (the notifier's thread reads finish meanwhile)."""
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(POLL / 5)

    await asyncio.wait_for(wait(), timeout)


def test_wakes_only_waiters_whose_queues_have_work():
    async def main():
        db = FakeDb()
        notifier = make(db)
        a = hold(notifier, db, "ag_a", ("a",), 30)
        b = hold(notifier, db, "ag_b", ("b",), 1)
        db.queued["a"] = 1
        assert await a is True
        assert await b is False
        await notifier.aclose()

    asyncio.run(main())


def test_one_read_per_cycle_for_every_waiter():
    async def main():
        db = FakeDb()
        notifier = make(db)
        waiters = [hold(notifier, db, f"ag_{i}", (f"q{i}",), 30) for i in range(300)]
        waiters += [hold(notifier, db, f"ag_s{i}", ("shared", f"x{i}"), 30) for i in range(20)]
        await _until(lambda: any(ids is not None for ids, _ in db.calls))
        db.queued.update({f"q{i}": 1 for i in range(300)} | {"shared": 20})
        assert all(await asyncio.gather(*waiters))
        assert db.max_active == 1  # never two reads at once
        # Each read of the agents holding polls asked for all of them in one call.
        agent_reads = [ids for ids, _ in db.calls if ids is not None]
        assert agent_reads and all(len(ids) == 320 for ids in agent_reads)
        await notifier.aclose()

    asyncio.run(main())


def test_wakes_the_oldest_waiters_and_no_more_than_there_are_jobs():
    async def main():
        db = FakeDb()
        notifier = make(db)
        waiters = []
        for i in range(5):
            waiters.append(hold(notifier, db, f"ag_{i}", ("a",), 1.0))
            await asyncio.sleep(0)  # registered in this order
        await _until(lambda: db.calls)
        db.lease_on_read = True
        db.queued["a"] = 2
        results = await asyncio.gather(*waiters)
        assert results == [True, True, False, False, False]
        await notifier.aclose()

    asyncio.run(main())


def test_a_refused_job_does_not_wake_the_agent_that_refused_it():
    async def main():
        db = FakeDb()
        db.queued["a"] = 1
        db.refused[("ag_1", "a")] = 1
        notifier = make(db)
        refuser = hold(notifier, db, "ag_1", ("a",), 0.5)
        other = hold(notifier, db, "ag_2", ("a",), 30)
        assert await other is True
        assert await refuser is False  # the only job on "a" is one ag_1 refused
        db.queued["b"] = 1
        db.grant("ag_1", ("a", "b"))
        assert await hold(notifier, db, "ag_1", ("a", "b"), 30) is True
        await notifier.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "view",
    [
        HolderView(AgentStatus.REVOKED, frozenset()),
        HolderView(AgentStatus.DRAINING, frozenset()),
        None,  # the agent row is gone
        HolderView(ACTIVE, frozenset({"a", "b"})),  # a policy now lets it serve b as well
        HolderView(ACTIVE, frozenset()),  # ... or no longer a
    ],
    ids=["revoked", "draining", "gone", "more-queues", "fewer-queues"],
)
def test_a_held_poll_is_woken_when_its_agent_changes(view):
    async def main():
        db = FakeDb()
        notifier = make(db)
        held = hold(notifier, db, "ag_1", ("a",), 30)
        bystander = hold(notifier, db, "ag_2", ("a",), 1.0)
        await _until(lambda: db.calls)
        db.agents["ag_1"] = view
        assert await held is True
        assert await bystander is False
        assert db.work_reads() >= 1 and not db.queued
        await notifier.aclose()

    asyncio.run(main())


def test_a_poll_without_free_slots_wakes_for_its_agent_only():
    async def main():
        db = FakeDb()
        db.queued["a"] = 1
        notifier = make(db)
        # An agent with no free slot: no queues to wait on, and a policy change does not matter.
        db.agents["ag_1"] = HolderView(ACTIVE, frozenset({"a"}))
        assert await hold(notifier, db, "ag_1", ("a",), 0.5, leasing=False) is False
        assert all(not work for _, work in db.calls)  # nobody waited for work: the table was not read
        held = hold(notifier, db, "ag_1", (), 30, leasing=False)
        reads = len(db.calls)
        await _until(lambda: len(db.calls) > reads + 1)  # read with the poll held, agent unchanged
        assert not held.done()
        db.agents["ag_1"] = HolderView(AgentStatus.REVOKED, frozenset())
        assert await held is True
        await notifier.aclose()

    asyncio.run(main())


def test_no_reads_while_nobody_waits():
    async def main():
        db = FakeDb()
        notifier = make(db)
        assert await hold(notifier, db, "ag_1", ("a",), 0.3) is False
        await asyncio.sleep(POLL * 2)  # a read already in flight when the waiter left may finish
        seen = len(db.calls)
        assert seen >= 1
        await asyncio.sleep(POLL * 10)
        assert len(db.calls) == seen
        await notifier.aclose()

    asyncio.run(main())


def test_close_releases_every_waiter_and_refuses_new_ones():
    async def main():
        listener = FakeListener()
        db = FakeDb()
        notifier = make(db, listener=listener)
        held = [
            hold(notifier, db, "ag_1", ("a",), 30),
            hold(notifier, db, "ag_2", (), 30, leasing=False),
        ]
        await asyncio.sleep(0)
        await notifier.aclose()
        assert await asyncio.gather(*held) == [False, False]
        assert await hold(notifier, db, "ag_1", ("a",), 30) is False
        await notifier.aclose()  # idempotent
        assert (listener.made, listener.started, listener.closed) == (1, 1, 1)

    asyncio.run(main())


def test_cancelled_waiter_is_forgotten():
    async def main():
        db = FakeDb()
        notifier = make(db)
        task = hold(notifier, db, "ag_1", ("a", "b"), 30)
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (notifier._by_queue, notifier._by_agent) == ({}, {})
        await notifier.aclose()

    asyncio.run(main())


def test_failing_reads_time_waiters_out_then_recover():
    async def main():
        db = FakeDb()
        db.fail = True
        notifier = make(db)
        db.queued["a"] = 1
        assert await hold(notifier, db, "ag_1", ("a",), 0.3) is False
        db.fail = False
        assert await hold(notifier, db, "ag_1", ("a",), 30) is True
        await notifier.aclose()

    asyncio.run(main())


def _listening_notifier(db: FakeDb, listener: FakeListener, monkeypatch) -> LeaseNotifier:
    """A notifier whose polls are minutes apart: within a test only notifications make it look."""
    monkeypatch.setattr(notify, "AGENT_CHECK_SECONDS", 300.0)
    return make(db, poll=300.0, listener=listener)


async def _bring_up(notifier: LeaseNotifier, db: FakeDb, listener: FakeListener) -> asyncio.Future:
    """Start poller and listener with a waiter on an unrelated queue; return once they are quiet."""
    first = hold(notifier, db, "ag_other", ("other",), 60)
    await _until(lambda: listener.on_listening is not None and db.calls)
    listener.on_listening(True)
    await _until(lambda: len(db.calls) >= 2)
    return first


def test_a_notification_wakes_a_waiter_without_waiting_for_the_poll(monkeypatch):
    async def main():
        db, listener = FakeDb(), FakeListener()
        notifier = _listening_notifier(db, listener, monkeypatch)
        first = await _bring_up(notifier, db, listener)  # coming up, it looks once for what it missed
        assert notifier.listening
        held = hold(notifier, db, "ag_1", ("a",), 60)
        reads = len(db.calls)
        listener.on_queue("elsewhere")  # nobody here waits on it: no read
        await asyncio.sleep(POLL * 4)
        assert len(db.calls) == reads and not held.done()
        db.queued["a"] = 1
        listener.on_queue("a")
        assert await held is True
        listener.on_listening(False)
        assert not notifier.listening
        first.cancel()
        await notifier.aclose()

    asyncio.run(main())


def test_a_notification_heard_during_the_lease_attempt_is_not_lost(monkeypatch):
    async def main():
        db, listener = FakeDb(), FakeListener()
        notifier = _listening_notifier(db, listener, monkeypatch)
        first = await _bring_up(notifier, db, listener)
        # A lease attempt runs (it saw no job); meanwhile the job is queued and its notification
        # heard, while no waiter for "a" is registered yet.
        since = notifier.mark()
        db.queued["a"] = 1
        listener.on_queue("a")
        assert await hold(notifier, db, "ag_1", ("a",), 60, since=since) is True
        # Without the mark (a notification from before the attempt), nothing is re-checked.
        assert await hold(notifier, db, "ag_2", ("a",), 0.3, since=notifier.mark()) is False
        first.cancel()
        await notifier.aclose()

    asyncio.run(main())


def test_one_notification_for_several_jobs_wakes_as_many_waiters(monkeypatch):
    async def main():
        db, listener = FakeDb(), FakeListener()
        notifier = _listening_notifier(db, listener, monkeypatch)
        first = await _bring_up(notifier, db, listener)
        waiters = []
        for i in range(3):
            waiters.append(hold(notifier, db, f"ag_{i}", ("a",), 1.5))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        db.lease_on_read = True
        db.queued["a"] = 2  # one transaction queued two jobs: PostgreSQL sends one notification
        listener.on_queue("a")
        assert await asyncio.gather(*waiters) == [True, True, False]
        first.cancel()
        await notifier.aclose()

    asyncio.run(main())


def test_a_notification_skips_an_agent_that_refused_a_job_queued_there(monkeypatch):
    async def main():
        db, listener = FakeDb(), FakeListener()
        db.queued["a"] = 1
        db.refused[("ag_1", "a")] = 1
        notifier = _listening_notifier(db, listener, monkeypatch)
        first = await _bring_up(notifier, db, listener)  # its reads saw ag_1's refusal on "a"
        refuser = hold(notifier, db, "ag_1", ("a",), 0.5)
        await asyncio.sleep(0)
        other = hold(notifier, db, "ag_2", ("a",), 30)
        await asyncio.sleep(0)
        listener.on_queue("a")
        assert await other is True
        assert await refuser is False
        first.cancel()
        await notifier.aclose()

    asyncio.run(main())


def test_a_waiter_woken_for_a_job_is_given_a_cycle_to_lease_it():
    async def main():
        db = FakeDb()
        notifier = make(db)
        woken_at: dict[str, int] = {}

        def waiter(agent_id: str):
            task = hold(notifier, db, agent_id, ("a",), 30)
            task.add_done_callback(lambda _t: woken_at.setdefault(agent_id, db.work_reads()))
            return task

        slow = waiter("ag_slow")
        await asyncio.sleep(0)
        second = waiter("ag_second")
        await _until(lambda: db.calls)
        db.queued["a"] = 1  # and it stays queued: the first woken poll's attempt has not finished
        assert await slow is True and await second is True
        # The read right after the first wake-up left the job to it; only a later one woke another.
        assert woken_at["ag_second"] >= woken_at["ag_slow"] + 2
        await notifier.aclose()

    asyncio.run(main())
