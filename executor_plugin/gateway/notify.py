"""Wake-up for long-polling lease requests: one poller per gateway process, running only while a
poll is held, whose database cost does not grow with the number of held polls.

Each cycle reads one snapshot (:mod:`executor_plugin.gateway.wait_probe`) for every waiter at once,
then wakes waiters in memory:

* **Work**: queued jobs counted per queue, and per agent for the task instances it refused. For each
  queue, the oldest waiters are woken, at most as many as there are jobs there that their agents
  have not refused. The check is level-triggered (is a job queued *now*?): a job queued between a
  waiter's lease attempt and its registration is seen at the next cycle, and a woken poll that
  leases nothing (another agent was faster) waits again, so no job waits long for a free agent.
* **Holders**: every :data:`AGENT_CHECK_SECONDS`, the rows of the agents that hold polls and the
  policies of their queues, in one batch. A waiter whose agent is gone, no longer active, or may now
  lease from other queues (a policy change) is woken, so its lease route re-reads the agent: a
  revoked agent's poll ends with 403, a drained one's with no lease, within about that time.

Cadence: a cycle every ``poll_interval`` seconds (SQLite; PostgreSQL while its listener is down).
On PostgreSQL the executor's enqueue sends ``NOTIFY`` with the queue's name
(:mod:`executor_plugin.gateway.job_channel`), and the process's one ``LISTEN`` connection
(:mod:`executor_plugin.gateway.pg_listen`) hands it here: the oldest waiter on that queue is woken
at once, without a query, and a cycle runs at once to count the queue's jobs (one notification may
stand for several). Polling then slows to every :data:`AGENT_CHECK_SECONDS`, which still finds the
work that comes back without a notification: expired leases requeued by the scheduler, a revoked
agent's jobs, jobs refused through another gateway.

Wake-ups are counted per queue until the next check, which leaves that many of the queue's jobs to
the polls already woken: their lease attempts may not have finished, and a slow attempt must not
have a second waiter woken for the same job at every cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from starlette.concurrency import run_in_threadpool

from executor_plugin.gateway.wait_probe import (
    HolderView,
    QueuedWork,
    Snapshot,
    read_snapshot,
)
from executor_plugin.models import AgentStatus

log = logging.getLogger(__name__)

#: How often the agents holding polls are re-read (revocation, drain, policy change reach a held
#: poll within this), and the safety poll for work while a PostgreSQL listener is up.
AGENT_CHECK_SECONDS = 1.0

#: ``probe(agent_ids, work)``: read the agents ``agent_ids`` (None: not this cycle) and, when
#: ``work``, the queued jobs. Runs in a worker thread.
Probe = Callable[[Sequence[str] | None, bool], Snapshot]


class Listener(Protocol):
    def start(self) -> None: ...

    async def aclose(self) -> None: ...


#: ``factory(on_queue, on_listening)``: a listener for this database, or None (poll only).
ListenerFactory = Callable[[Callable[[str], None], Callable[[bool], None]], "Listener | None"]


def _airflow_listener(on_queue: Callable[[str], None], on_listening: Callable[[bool], None]) -> Listener | None:
    from executor_plugin.gateway.pg_listen import for_airflow_engine

    return for_airflow_engine(on_queue, on_listening)


_arrivals = itertools.count()


@dataclass(eq=False)
class _Waiter:
    agent_id: str
    #: The queues the lease attempt found the agent may serve (empty: not woken for work).
    queues: frozenset[str]
    #: Whether the poll leases (has a free slot): only then does a change of its queues matter.
    leasing: bool
    seq: int = field(default_factory=lambda: next(_arrivals))
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def outdated_by(self, view: HolderView | None) -> bool:
        """Does the agent's row, as read now, call for a new lease attempt?"""
        if view is None or view.state != AgentStatus.ACTIVE:
            return True
        return self.leasing and view.eligible != self.queues


class LeaseNotifier:
    def __init__(
        self,
        poll_interval: float = 0.1,
        *,
        probe: Probe = read_snapshot,
        listener: ListenerFactory | None = _airflow_listener,
    ) -> None:
        self._probe = probe
        self._listener_factory = listener
        self._listener: Listener | None = None
        self._poll_interval = max(poll_interval, 0.01)
        #: The waiters by queue and by agent (every waiter is in ``_by_agent``), oldest first.
        self._by_queue: dict[str, dict[_Waiter, None]] = {}
        self._by_agent: dict[str, dict[_Waiter, None]] = {}
        self._wanted: asyncio.Event | None = None
        self._poked: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = False
        #: Notifications heard: a counter, and its value at each queue's latest one ("" for those
        #: without a queue name), so a waiter can tell whether one came during its lease attempt.
        self._heard = 0
        self._heard_for: dict[str, int] = {}
        #: Wake-ups per queue since the latest check began. Their lease attempts may still be
        #: running, with the job still queued, so the next check counts them as served: without
        #: this, a slow attempt would have a second waiter woken for the same job at every cycle.
        self._claims: Counter[str] = Counter()
        #: (agent, queue) pairs with a refused job queued there, as of the latest check.
        self._refusers: frozenset[tuple[str, str]] = frozenset()
        self._next_holder_check = 0.0
        self._closed = False
        self._failing = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def listening(self) -> bool:
        """True while a PostgreSQL listener delivers enqueue notifications."""
        return self._listening

    def mark(self) -> int:
        """Call before a lease attempt and pass the result to :meth:`wait` as ``since``."""
        return self._heard

    async def wait(
        self, agent_id: str, queues: Iterable[str], timeout: float, *, leasing: bool = True, since: int | None = None
    ) -> bool:
        """Wait until a job the agent may take may be queued on ``queues``, the agent's row changed
        (see the module docstring), the timeout ends, or the notifier closes.

        Returns True when woken for a new lease attempt. ``leasing=False`` (no free slot): never
        woken for work, only for a change of the agent's state. ``since``: :meth:`mark` taken before
        the lease attempt that preceded this wait; a notification for ``queues`` heard since then
        may be for a job that attempt missed, so it is checked for at once.
        """
        if self._closed or timeout <= 0:
            return False
        waiter = _Waiter(agent_id, frozenset(queues) if leasing else frozenset(), leasing)
        self._add(waiter)
        self._start()
        assert self._wanted is not None
        self._wanted.set()
        if since is not None and self._heard != since and self._heard_since(waiter.queues, since):
            self.poke()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), timeout)
            return waiter.event.is_set() and not self._closed
        finally:
            self._remove(waiter)

    def poke(self) -> None:
        """Check at once instead of at the next cycle (e.g. after this process requeued a job)."""
        if self._poked is not None:
            self._poked.set()

    async def aclose(self) -> None:
        """Wake every waiter (they answer 'no lease'), stop the poller and the listener. Idempotent."""
        self._closed = True
        for group in self._by_agent.values():
            for waiter in group:
                waiter.event.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None

    # -- registry ----------------------------------------------------------------------------------

    def _add(self, waiter: _Waiter) -> None:
        self._by_agent.setdefault(waiter.agent_id, {})[waiter] = None
        for queue in waiter.queues:
            self._by_queue.setdefault(queue, {})[waiter] = None

    def _remove(self, waiter: _Waiter) -> None:
        for index, name in [(self._by_agent, waiter.agent_id), *((self._by_queue, q) for q in waiter.queues)]:
            group = index.get(name)
            if group is not None:
                group.pop(waiter, None)
                if not group:
                    del index[name]

    # -- the poller and the listener ---------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wanted = asyncio.Event()
            self._poked = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edge-agent-lease-notifier")
        if self._listener is None and self._listener_factory is not None:
            factory, self._listener_factory = self._listener_factory, None  # one attempt per process
            try:
                self._listener = factory(self._on_queue, self._on_listening)
            except Exception:
                log.exception("cannot set up the database listener; lease wake-ups poll instead")
            if self._listener is not None:
                self._listener.start()

    def _on_queue(self, queue: str) -> None:
        self._heard += 1
        self._heard_for[queue] = self._heard
        if not queue:
            self.poke()  # a notification without a queue name: look at every queue
            return
        waiters = self._by_queue.get(queue)
        if not waiters:
            return  # nobody here waits on it: not even a query
        # Wake the oldest waiter at once, without a query; skip agents that refused a job queued
        # there (the job may be a retry of what they refused: the check below finds who may take it).
        for waiter in waiters:
            if not waiter.event.is_set() and (waiter.agent_id, queue) not in self._refusers:
                waiter.event.set()
                self._claims[queue] += 1
                break
        # Then count: one notification may stand for several jobs (PostgreSQL folds a transaction's
        # identical notifications into one).
        self.poke()

    def _heard_since(self, queues: Iterable[str], since: int) -> bool:
        return self._heard_for.get("", 0) > since or any(self._heard_for.get(q, 0) > since for q in queues)

    def _on_listening(self, up: bool) -> None:
        self._listening = up
        # Up: notifications sent while nobody listened are lost, so look now. Down: poll at once.
        self.poke()

    async def _run(self) -> None:
        assert self._wanted is not None and self._poked is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._by_agent:
                # No poll held: no queries until one is. (No await between the test and the clear,
                # so a waiter arriving now cannot be missed.)
                self._wanted.clear()
                await self._wanted.wait()
                continue
            self._poked.clear()
            holders_due = loop.time() >= self._next_holder_check
            if holders_due:
                self._next_holder_check = loop.time() + AGENT_CHECK_SECONDS
            read_work = bool(self._by_queue)
            if read_work or holders_due:
                await self._cycle(read_work, holders_due)
            interval = AGENT_CHECK_SECONDS if self._listening or not self._by_queue else self._poll_interval
            pause = min(interval, max(self._next_holder_check - loop.time(), 0.0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), pause)

    async def _cycle(self, read_work: bool, read_holders: bool) -> None:
        asked = list(self._by_agent) if read_holders else None
        before = next(_arrivals)  # waiters registered from now on were not judged by this snapshot
        claimed = Counter[str]()
        if read_work:
            claimed, self._claims = self._claims, Counter()
        snapshot = await self._read(asked, read_work)
        if snapshot is None:
            return
        if snapshot.holders is not None and asked is not None:
            self._wake_outdated(asked, snapshot.holders, before)
        if snapshot.work is not None:
            self._wake_for_work(snapshot.work, claimed)

    def _wake_outdated(self, asked: list[str], holders: Mapping[str, HolderView], before: int) -> None:
        for agent_id in asked:
            for waiter in list(self._by_agent.get(agent_id, ())):
                if waiter.seq < before and waiter.outdated_by(holders.get(agent_id)):
                    waiter.event.set()

    def _wake_for_work(self, work: QueuedWork, claimed: Counter[str]) -> None:
        self._refusers = frozenset(work.refused)
        for queue, jobs in work.queued.items():
            budget = jobs - claimed[queue]
            for waiter in list(self._by_queue.get(queue, ())):
                if budget <= 0:
                    break
                if not waiter.event.is_set() and work.takeable(waiter.agent_id, queue) > 0:
                    waiter.event.set()
                    self._claims[queue] += 1
                    budget -= 1

    async def _read(self, agent_ids: list[str] | None, work: bool) -> Snapshot | None:
        try:
            snapshot = await run_in_threadpool(self._probe, agent_ids, work)
        except Exception:
            # A database outage would otherwise log ten tracebacks a second: log once per outage.
            if not self._failing:
                log.exception("lease wake-up check failed; waiting lease requests will time out")
            self._failing = True
            return None
        if self._failing:
            log.info("lease wake-up check works again")
            self._failing = False
        return snapshot


__all__ = ["AGENT_CHECK_SECONDS", "LeaseNotifier", "Listener", "ListenerFactory", "Probe"]
