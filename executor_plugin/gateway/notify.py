"""Wake-up for long-polling lease requests: one poller per gateway process, running only while
someone waits.

Jobs are queued by the scheduler in another process, so nothing inside the gateway learns of them;
the poller asks the database (``store.queued_exists``) every ``poll_interval`` seconds, one query
per distinct queue set among the waiters, and wakes the waiters whose queues have work. The check
is level-triggered (is there a queued job *now*?), so a job queued between a waiter's last lease
attempt and its registration is still seen at the next poll: no wake-up can be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

QueueSet = tuple[str, ...]
#: Given the queue sets waiters listen on, return those that have queued work (runs in a thread).
ReadyCheck = Callable[[list[QueueSet]], Iterable[QueueSet]]


class LeaseNotifier:
    def __init__(self, check: ReadyCheck, poll_interval: float) -> None:
        self._check = check
        self._poll_interval = max(poll_interval, 0.01)
        self._waiters: dict[QueueSet, set[asyncio.Event]] = {}
        self._wanted: asyncio.Event | None = None
        self._poked: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait(self, queues: QueueSet, timeout: float) -> bool:
        """Wait until work may be queued on ``queues``, the timeout ends, or the notifier closes.

        Returns True when woken for work. An empty ``queues`` only waits for timeout or close (an
        agent with no free slot holds its poll without being woken).
        """
        if self._closed or timeout <= 0:
            return False
        key = tuple(sorted(set(queues)))
        event = asyncio.Event()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(event)
        if key:
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
            sets = [queues for queues, waiters in self._waiters.items() if queues and waiters]
            if not sets:
                # Nobody waits for work: no queries until someone does. (No await between computing
                # ``sets`` and clearing the flag, so a waiter arriving now cannot be missed.)
                self._wanted.clear()
                await self._wanted.wait()
                continue
            for queues in await self._ready(sets):
                for event in list(self._waiters.get(queues, ())):
                    event.set()
            self._poked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._poll_interval)

    async def _ready(self, sets: list[QueueSet]) -> list[QueueSet]:
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


__all__ = ["LeaseNotifier", "QueueSet", "ReadyCheck"]
