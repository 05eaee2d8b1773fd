"""The lease notifier on a real event loop, with the database check replaced by a recording function
(the gateway tests exercise it against SQLite; these pin its waking and polling rules)."""

from __future__ import annotations

import asyncio
import threading

from executor_plugin.gateway.notify import LeaseNotifier, WaitKey

POLL = 0.05


class Check:
    """Stands in for ``store.queued_exists`` over each wait key; records what it was asked.

    ``ready`` names queues with work; ``refused`` maps an agent to the queues whose only work it
    refused (a key with that agent as ``refused_by`` does not see them).
    """

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.refused: dict[str, set[str]] = {}
        self.calls: list[list[WaitKey]] = []
        self.fail = False
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, sets):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append(sorted(sets, key=lambda k: (k.queues, k.refused_by or "")))
            if self.fail:
                raise RuntimeError("database is down")
            return [k for k in sets if (self.ready - self.refused.get(k.refused_by, set())) & set(k.queues)]
        finally:
            with self._lock:
                self.active -= 1


def test_wakes_only_waiters_whose_queues_have_work():
    async def main():
        check = Check()
        notifier = LeaseNotifier(check, POLL)
        a = asyncio.create_task(notifier.wait(("a",), 30))
        b = asyncio.create_task(notifier.wait(("b",), 1))
        check.ready.add("a")
        assert await a is True
        assert await b is False
        await notifier.aclose()

    asyncio.run(main())


def test_one_poller_one_query_per_distinct_queue_set():
    async def main():
        check = Check()
        notifier = LeaseNotifier(check, POLL)
        waiters = [asyncio.create_task(notifier.wait(("a", "b"), 30)) for _ in range(20)]
        waiters += [asyncio.create_task(notifier.wait(("b", "a"), 30)) for _ in range(5)]  # same set
        waiters += [asyncio.create_task(notifier.wait(("c",), 30)) for _ in range(5)]
        # Every waiter registers before the poller's first run (tasks start in creation order).
        check.ready.update({"b", "c"})
        assert all(await asyncio.gather(*waiters))
        assert check.max_active == 1
        assert all(call == [WaitKey(("a", "b")), WaitKey(("c",))] for call in check.calls)
        await notifier.aclose()

    asyncio.run(main())


def test_no_queries_while_nobody_waits():
    async def main():
        check = Check()
        notifier = LeaseNotifier(check, POLL)
        assert await notifier.wait(("a",), 0.3) is False
        await asyncio.sleep(POLL * 2)  # a check already in flight when the waiter left may finish
        seen = len(check.calls)
        assert seen >= 1
        await asyncio.sleep(POLL * 10)
        assert len(check.calls) == seen
        # Holding without free slots (no queues) does not poll either.
        assert await notifier.wait((), 0.2) is False
        assert len(check.calls) == seen
        await notifier.aclose()

    asyncio.run(main())


def test_close_releases_every_waiter_and_refuses_new_ones():
    async def main():
        notifier = LeaseNotifier(Check(), POLL)
        held = [asyncio.create_task(notifier.wait(("a",), 30)), asyncio.create_task(notifier.wait((), 30))]
        await asyncio.sleep(0)
        await notifier.aclose()
        assert await asyncio.gather(*held) == [False, False]
        assert await notifier.wait(("a",), 30) is False
        await notifier.aclose()  # idempotent

    asyncio.run(main())


def test_cancelled_waiter_is_forgotten():
    async def main():
        notifier = LeaseNotifier(Check(), POLL)
        task = asyncio.create_task(notifier.wait(("a",), 30))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert notifier._waiters == {}
        await notifier.aclose()

    asyncio.run(main())


def test_failing_check_times_waiters_out_then_recovers():
    async def main():
        check = Check()
        check.fail = True
        notifier = LeaseNotifier(check, POLL)
        check.ready.add("a")
        assert await notifier.wait(("a",), 0.3) is False
        check.fail = False
        assert await notifier.wait(("a",), 30) is True
        await notifier.aclose()

    asyncio.run(main())


def test_a_refusing_agent_waits_on_its_own_key_and_is_not_woken_by_what_it_refused():
    async def main():
        check = Check()
        check.ready.add("a")
        check.refused["ag_1"] = {"a"}
        notifier = LeaseNotifier(check, POLL)
        shared = asyncio.create_task(notifier.wait(("a",), 30))
        own = asyncio.create_task(notifier.wait(("a",), 0.5, refused_by="ag_1"))
        assert await shared is True
        assert await own is False  # the only job on "a" is one ag_1 refused
        assert WaitKey(("a",), "ag_1") in {key for call in check.calls for key in call}
        check.ready.add("b")
        assert await notifier.wait(("a", "b"), 30, refused_by="ag_1") is True
        await notifier.aclose()

    asyncio.run(main())
