"""Per-queue metrics through Airflow's own metrics (StatsD or OpenTelemetry, as ``[metrics]`` says).

Every ``EMIT_EVERY`` seconds the executor's sync calls :meth:`QueueMetrics.maybe_emit`, which reads
our tables once and emits, for every queue that has jobs or agents:

=======================================  ========  =================================================
``edge_agent.queue.<q>.queued_jobs``     gauge     jobs waiting for an agent
``edge_agent.queue.<q>.running_jobs``    gauge     jobs leased or running
``edge_agent.queue.<q>.agents_online``   gauge     active agents serving the queue, heartbeat fresh
``edge_agent.queue.<q>.free_slots``      gauge     free slots of those agents (an agent serving two
                                                   queues counts in both)
``edge_agent.queue.<q>.lease_latency``   timer     queued -> leased of each job leased since the
                                                   previous emission
=======================================  ========  =================================================

Each metric also carries a ``queue`` tag (kept by OpenTelemetry and tag-aware StatsD flavours);
plain StatsD drops tags, hence the queue in the name. Queue names are reduced to the characters
StatsD names allow.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from executor_plugin.models import AgentStatus, JobStatus, agent_table, job_table

log = logging.getLogger(__name__)

EMIT_EVERY = 10.0
PREFIX = "edge_agent.queue"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class QueueFigures:
    queued_jobs: int = 0
    running_jobs: int = 0
    agents_online: int = 0
    free_slots: int = 0
    lease_latencies: list[timedelta] = field(default_factory=list)


def stat_name(queue: str, metric: str) -> str:
    return f"{PREFIX}.{_UNSAFE.sub('_', queue)[:100]}.{metric}"


def _aware(value: datetime) -> datetime:
    from datetime import timezone

    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def collect(session: Session, *, now: datetime, online_after: datetime, leased_since: datetime) -> dict[str, QueueFigures]:
    """One read of the tables: figures per queue (queues with neither jobs nor agents are absent)."""
    figures: dict[str, QueueFigures] = defaultdict(QueueFigures)
    counts = session.execute(
        select(job_table.c.queue, job_table.c.state, func.count())
        .where(job_table.c.state.in_((JobStatus.QUEUED, *JobStatus.ACTIVE)))
        .group_by(job_table.c.queue, job_table.c.state)
    ).all()
    for queue, state, n in counts:
        if state == JobStatus.QUEUED:
            figures[queue].queued_jobs += n
        else:
            figures[queue].running_jobs += n
    agents = session.execute(
        select(agent_table.c.queues, agent_table.c.slots_free, agent_table.c.last_heartbeat)
        .where(agent_table.c.state == AgentStatus.ACTIVE)
    ).all()
    for queues_json, slots_free, last_heartbeat in agents:
        if last_heartbeat is None or _aware(last_heartbeat) < online_after:
            continue
        for queue in json.loads(queues_json):
            figures[queue].agents_online += 1
            figures[queue].free_slots += max(0, slots_free or 0)
    leased = session.execute(
        select(job_table.c.queue, job_table.c.queued_at, job_table.c.leased_at)
        .where(job_table.c.leased_at > leased_since, job_table.c.leased_at <= now)
    ).all()
    for queue, queued_at, leased_at in leased:
        figures[queue].lease_latencies.append(_aware(leased_at) - _aware(queued_at))
    return dict(figures)


class QueueMetrics:
    """Emits :func:`collect`'s figures through ``airflow.stats.Stats`` at most every ``every`` seconds."""

    def __init__(
        self,
        dead_after: timedelta,
        *,
        every: float = EMIT_EVERY,
        clock: Callable[[], float] = time.monotonic,
        stats: object | None = None,
    ) -> None:
        self.dead_after = dead_after
        self.every = every
        self._clock = clock
        self._next = 0.0
        self._stats = stats
        self._leased_since: datetime | None = None
        #: Queues emitted last time: a queue that empties is emitted once more, as zeros.
        self._seen: set[str] = set()

    def maybe_emit(self, session: Session, now: datetime) -> bool:
        if self._clock() < self._next:
            return False
        self._next = self._clock() + self.every
        since = self._leased_since or now
        figures = collect(session, now=now, online_after=now - self.dead_after, leased_since=since)
        self._leased_since = now
        for queue in self._seen - set(figures):
            figures[queue] = QueueFigures()
        self._seen = {q for q, f in figures.items() if f.queued_jobs or f.running_jobs or f.agents_online}
        stats = self._stats or _airflow_stats()
        for queue, f in figures.items():
            tags = {"queue": queue}
            stats.gauge(stat_name(queue, "queued_jobs"), f.queued_jobs, tags=tags)
            stats.gauge(stat_name(queue, "running_jobs"), f.running_jobs, tags=tags)
            stats.gauge(stat_name(queue, "agents_online"), f.agents_online, tags=tags)
            stats.gauge(stat_name(queue, "free_slots"), f.free_slots, tags=tags)
            for latency in f.lease_latencies:
                stats.timing(stat_name(queue, "lease_latency"), latency, tags=tags)
        return True


def _airflow_stats() -> object:
    # The module Airflow's own executors emit through (``airflow.stats`` is deprecated in 3.3).
    from airflow._shared.observability.metrics import stats

    return stats


__all__ = ["EMIT_EVERY", "QueueFigures", "QueueMetrics", "collect", "stat_name"]
