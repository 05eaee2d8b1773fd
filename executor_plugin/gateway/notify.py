"""Wake-up for long-polling lease requests: one poller per gateway process, running only while
someone waits.

Jobs are queued by the scheduler in another process, so nothing inside the gateway learns of them;
the poller asks the database (``store.queued_exists``) every ``poll_interval`` seconds, one query
per distinct :class:`WaitKey` among the waiters, and wakes the waiters whose key has work. The check
is level-triggered (is there a queued job *now*?), so a job queued between a waiter's last lease
attempt and its registration is still seen at the next poll: no wake-up can be lost.

A key is a queue set, shared by every agent serving those queues, plus optionally one agent whose
refusals the check ignores. Without that, a job an agent refused (left queued for another agent)
would wake that agent at every poll for nothing; the lease route switches an agent to its own key
only after such a fruitless wake-up, so agents keep sharing one query in the common case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

QueueSet = tuple[str, ...]


class WaitKey(NamedTuple):
    queues: QueueSet
    #: Ignore the task instances this agent refused (None: count every queued job).
    refused_by: str | None = None


#: Given the keys waiters listen on, return those that have queued work (runs in a thread).
ReadyCheck = Callable[[list[WaitKey]], Iterable[WaitKey]]


class LeaseNotifier:
    def __init__(self, check: ReadyCheck, poll_interval: float) -> None:
        self._check = check
        self._poll_interval = max(poll_interval, 0.01)
        self._waiters: dict[WaitKey, set[asyncio.Event]] = {}
        self._wanted: asyncio.Event | None = None
        self._poked: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait(self, queues: QueueSet, timeout: float, *, refused_by: str | None = None) -> bool:
        """Wait until work may be queued on ``queues``, the timeout ends, or the notifier closes.

        Returns True when woken for work. An empty ``queues`` only waits for timeout or close (an
        agent with no free slot holds its poll without being woken). ``refused_by``: do not wake
        for jobs that agent refused.
        """
        if self._closed or timeout <= 0:
            return False
        key = WaitKey(tuple(sorted(set(queues))), refused_by if queues else None)
        event = asyncio.Event()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(event)
        if key.queues:
            self._ensure_task()
            assert self._wanted is not None
            self._wanted.set()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return event.is_set() and not self._closed
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]

    def poke(self) -> None:
        """Check at once instead of at the next poll (e.g. after this process requeued a job)."""
        if self._poked is not None:
            self._poked.set()

    async def aclose(self) -> None:
        """Wake every waiter (they answer 'no lease') and stop the poller. Idempotent."""
        self._closed = True
        for waiters in list(self._waiters.values()):
            for event in list(waiters):
                event.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the poller --------------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._wanted = asyncio.Event()
            self._poked = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edge-agent-lease-notifier")

    async def _run(self) -> None:
        assert self._wanted is not None and self._poked is not None
        while not self._closed:
            sets = [key for key, waiters in self._waiters.items() if key.queues and waiters]
            if not sets:
                # Nobody waits for work: no queries until someone does. (No await between computing
                # ``sets`` and clearing the flag, so a waiter arriving now cannot be missed.)
                self._wanted.clear()
                await self._wanted.wait()
                continue
            for key in await self._ready(sets):
                for event in list(self._waiters.get(key, ())):
                    event.set()
            self._poked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._poll_interval)

    async def _ready(self, sets: list[WaitKey]) -> list[WaitKey]:
        try:
            ready = list(await run_in_threadpool(self._check, sets))
        except Exception:
            # A database outage would otherwise log ten tracebacks a second: log once per outage.
            if not self._failing:
                log.exception("lease wake-up check failed; waiting lease requests will time out")
            self._failing = True
            return []
        if self._failing:
            log.info("lease wake-up check works again")
            self._failing = False
        return ready


__all__ = ["LeaseNotifier", "QueueSet", "ReadyCheck", "WaitKey"]
