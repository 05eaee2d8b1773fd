"""What the Edge agents page and its REST API show: one row per agent and one per queue.

:func:`agent_rows` and :func:`queue_rows` are pure (rows in, rows out); :func:`snapshot` reads
what they need in one session. A queue row counts its jobs by state, the agents that could lease
from it right now (online, active, granted the queue, region admitted by its policy) and their
free slots, and how long recent jobs waited for a lease.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from statistics import median
from typing import TYPE_CHECKING, Any

from executor_plugin.explain import as_utc, jsonable
from executor_plugin.models import AgentStatus, JobStatus
from executor_plugin.policy import QueuePolicy, could_serve, log_policy, may_lease

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from executor_plugin.store import Agent

#: Lease latency is measured over the jobs leased this recently.
LATENCY_WINDOW = timedelta(minutes=15)

ONLINE = "online"
OFFLINE = "offline"


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    queues: tuple[str, ...]
    region: str
    #: active | draining | revoked (what an admin set)
    state: str
    #: online | offline | draining | revoked (what the page shows first)
    status: str
    online: bool
    slots_free: int
    slots_total: int
    running_jobs: int
    last_heartbeat: datetime | None
    heartbeat_age_seconds: float | None
    version: str | None
    cert_not_after: datetime | None
    cert_expires_in_seconds: float | None
    created_at: datetime


@dataclass(frozen=True)
class QueueRow:
    queue: str
    queued: int
    leased: int
    running: int
    #: Agents that could lease from the queue now: online, active, granted it, region admitted.
    agents_online: int
    #: Agents granted the queue in a region its policy admits, not revoked (online or not).
    agents_serving: int
    free_slots: int
    logs: str
    regions: tuple[str, ...] | None
    oldest_queued_seconds: float | None
    #: Queue-to-lease time of jobs leased in the last :data:`LATENCY_WINDOW` (median and max).
    lease_latency_seconds: float | None
    lease_latency_max_seconds: float | None
    leased_recently: int


@dataclass(frozen=True)
class JobCounts:
    """Open jobs of one queue: how many per state, and when the oldest queued one was queued."""

    queued: int = 0
    leased: int = 0
    running: int = 0
    oldest_queued_at: datetime | None = None


def status_of(agent: Agent, online: bool) -> str:
    if agent.state == AgentStatus.REVOKED:
        return AgentStatus.REVOKED
    if agent.state == AgentStatus.DRAINING:
        return AgentStatus.DRAINING
    return ONLINE if online else OFFLINE


def agent_rows(
    agents: Iterable[Agent], running: Mapping[str, int], *, now: datetime, window: timedelta
) -> list[AgentRow]:
    rows = []
    for agent in agents:
        online = agent.is_online(window, now)
        rows.append(
            AgentRow(
                id=agent.id,
                name=agent.name,
                queues=tuple(agent.queues),
                region=agent.region,
                state=agent.state,
                status=status_of(agent, online),
                online=online,
                slots_free=agent.slots_free,
                slots_total=agent.slots_total,
                running_jobs=running.get(agent.id, 0),
                last_heartbeat=agent.last_heartbeat,
                heartbeat_age_seconds=agent.heartbeat_age(now),
                version=agent.version,
                cert_not_after=agent.cert_not_after,
                cert_expires_in_seconds=(agent.cert_not_after - now).total_seconds() if agent.cert_not_after else None,
                created_at=agent.created_at,
            )
        )
    return rows


def queue_rows(
    agents: Sequence[Agent],
    policies: Mapping[str, QueuePolicy],
    counts: Mapping[str, JobCounts],
    latencies: Mapping[str, Sequence[float]],
    *,
    now: datetime,
    window: timedelta,
) -> list[QueueRow]:
    """One row per queue that an agent is granted, a policy names or an open job uses."""
    live = [a for a in agents if a.state != AgentStatus.REVOKED]
    names = {q for a in live for q in a.queues} | set(policies) | set(counts)
    rows = []
    for queue in sorted(names):
        policy = policies.get(queue)
        regions = policy.regions if policy is not None else None
        serving = [a for a in live if could_serve(a, queue, policy)]
        ready = [a for a in serving if may_lease(a, queue, policy)[0] and a.is_online(window, now)]
        count = counts.get(queue, JobCounts())
        waits = list(latencies.get(queue, ()))
        rows.append(
            QueueRow(
                queue=queue,
                queued=count.queued,
                leased=count.leased,
                running=count.running,
                agents_online=len(ready),
                agents_serving=len(serving),
                free_slots=sum(max(0, a.slots_free) for a in ready),
                logs=log_policy(policy),
                regions=regions,
                oldest_queued_seconds=(
                    max(0.0, (now - count.oldest_queued_at).total_seconds()) if count.oldest_queued_at else None
                ),
                lease_latency_seconds=median(waits) if waits else None,
                lease_latency_max_seconds=max(waits) if waits else None,
                leased_recently=len(waits),
            )
        )
    return rows


def to_json(row: Any) -> dict[str, Any]:
    """A row as JSON-ready data (datetimes as ISO 8601, tuples as lists)."""
    return jsonable(asdict(row))


# ---------------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------------


def job_counts(session: Session) -> dict[str, JobCounts]:
    """Open jobs per queue (queued, leased, running) and the oldest queued one's age."""
    from sqlalchemy import func, select

    from executor_plugin.models import job_table

    j = job_table.c
    rows = session.execute(
        select(j.queue, j.state, func.count(), func.min(j.queued_at))
        .where(j.state.in_((JobStatus.QUEUED, *JobStatus.ACTIVE)))
        .group_by(j.queue, j.state)
    )
    found: dict[str, dict[str, Any]] = {}
    for queue, state, count, oldest in rows:
        entry = found.setdefault(queue, {})
        entry[state] = count
        if state == JobStatus.QUEUED:
            entry["oldest"] = as_utc(oldest)
    return {
        queue: JobCounts(
            queued=e.get(JobStatus.QUEUED, 0),
            leased=e.get(JobStatus.LEASED, 0),
            running=e.get(JobStatus.RUNNING, 0),
            oldest_queued_at=e.get("oldest"),
        )
        for queue, e in found.items()
    }


def lease_latencies(session: Session, *, now: datetime, since: timedelta = LATENCY_WINDOW) -> dict[str, list[float]]:
    """Seconds from queued to leased of the jobs leased since ``now - since``, per queue."""
    from sqlalchemy import select

    from executor_plugin.models import job_table

    j = job_table.c
    rows = session.execute(select(j.queue, j.queued_at, j.leased_at).where(j.leased_at >= now - since))
    found: dict[str, list[float]] = {}
    for queue, queued_at, leased_at in rows:
        waited = (as_utc(leased_at) - as_utc(queued_at)).total_seconds()
        found.setdefault(queue, []).append(max(0.0, waited))
    return found


@dataclass(frozen=True)
class Snapshot:
    agents: list[AgentRow]
    queues: list[QueueRow]
    generated_at: datetime
    dead_after_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "agents": [to_json(r) for r in self.agents],
            "queues": [to_json(r) for r in self.queues],
            "generated_at": self.generated_at.isoformat(),
            "dead_after_seconds": self.dead_after_seconds,
        }


def snapshot(session: Session, *, window: timedelta, now: datetime | None = None) -> Snapshot:
    from executor_plugin import store

    now = now or store.utcnow()
    agents = store.list_agents(session)
    return Snapshot(
        agents=agent_rows(agents, store.running_job_counts(session), now=now, window=window),
        queues=queue_rows(
            agents, store.queue_policies(session), job_counts(session), lease_latencies(session, now=now),
            now=now, window=window,
        ),
        generated_at=now,
        dead_after_seconds=window.total_seconds(),
    )


__all__ = [
    "AgentRow",
    "JobCounts",
    "LATENCY_WINDOW",
    "QueueRow",
    "Snapshot",
    "agent_rows",
    "job_counts",
    "lease_latencies",
    "queue_rows",
    "snapshot",
    "status_of",
]
