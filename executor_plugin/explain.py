"""Why each agent can or cannot take one task instance: a pure decision, and the reads it needs.

:func:`explain` is a pure function over store rows (agents, the task's jobs, the queue's policy,
refusals) and the clock; it reaches the same verdict ``store.lease_next`` would, and says why, for
every agent. :func:`gather` reads those rows in one session and calls it. The admin command
(``airflow edge-agents explain``) and the UI (``GET /edge-agents/api/v1/explain``) both use it.

Reasons an agent cannot take the task now (an agent can have several; each is listed):

==================== ===========================================================================
``revoked``          the agent is revoked: nothing is handed to it again
``queue_not_served`` the task's queue is not one its registration token granted
``region_excluded``  the queue's policy does not admit the agent's region
``refused``          the agent's local policy refused this task instance before (any try)
``draining``         the agent was drained: it takes no new jobs until ``resume``
``offline``          no heartbeat for longer than ``[edge_agent] agent_dead_after_seconds``
``no_free_slots``    online, but every slot is busy (it leases again when one frees up)
==================== ===========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from executor_plugin.models import AgentStatus, JobStatus
from executor_plugin.policy import QueuePolicy, log_policy, region_allowed
from executor_plugin.settings import DEFAULT_AGENT_DEAD_AFTER_SECONDS

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from executor_plugin.store import Agent

#: The default of ``[edge_agent] agent_dead_after_seconds``.
DEFAULT_DEAD_AFTER = timedelta(seconds=DEFAULT_AGENT_DEAD_AFTER_SECONDS)
#: The executor's class name: a task instance whose ``executor`` names it runs on edge agents.
EXECUTOR_CLASS = "EdgeAgentExecutor"

REVOKED = "revoked"
QUEUE_NOT_SERVED = "queue_not_served"
REGION_EXCLUDED = "region_excluded"
REFUSED = "refused"
DRAINING = "draining"
OFFLINE = "offline"
NO_FREE_SLOTS = "no_free_slots"


class ExplainError(Exception):
    """The question cannot be answered (e.g. no such task instance); the message says why."""


class TaskNotFound(ExplainError):
    pass


@dataclass(frozen=True)
class TaskRef:
    """Which task instance (and try) to explain; ``try_number=None`` means its current try."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int | None = None


@dataclass(frozen=True)
class TaskFacts:
    """Airflow's own row of the task instance (``task_instance``)."""

    state: str | None
    try_number: int
    queue: str
    executor: str | None


@dataclass(frozen=True)
class JobFacts:
    """One row of ``edge_agent_job`` for the task instance (one try)."""

    id: str
    try_number: int
    queue: str
    state: str
    agent_id: str | None
    queued_at: datetime
    leased_at: datetime | None = None
    lease_expires_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Refusal:
    """An agent's local policy refused this task instance (recorded once per agent, any try)."""

    agent_id: str
    try_number: int
    reason: str | None
    refused_at: datetime


@dataclass(frozen=True)
class Reason:
    code: str
    message: str


@dataclass(frozen=True)
class AgentVerdict:
    agent_id: str
    name: str
    region: str
    state: str
    online: bool
    #: Would the next lease of this agent be allowed to hand it this task (now)?
    can_take: bool
    #: The agent holds the selected try's job (leased or running).
    holds_job: bool
    reasons: tuple[Reason, ...] = ()


@dataclass(frozen=True)
class Explanation:
    task: TaskRef  # try_number resolved (None only when the task instance was never tried)
    queue: str
    executor: str | None
    on_edge_agents: bool
    ti_state: str | None
    logs: str  # hosted | local: where the queue's task logs go
    regions: tuple[str, ...] | None  # the queue policy's region patterns; None: any region
    job: JobFacts | None
    #: One sentence about the job of the selected try (queued since..., running on..., ...).
    job_status: str
    agents: tuple[AgentVerdict, ...]
    #: One sentence: who can take it, or why nobody can.
    summary: str
    generated_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def takers(self) -> tuple[AgentVerdict, ...]:
        return tuple(v for v in self.agents if v.can_take)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (datetimes as ISO 8601 strings)."""
        return jsonable(asdict(self))


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------------


def runs_on_edge_agents(executor: str | None, configured: str) -> bool:
    """Does a task instance's ``executor`` field (None: the default executor) name our executor?

    ``configured`` is ``[core] executor``: comma-separated entries, the first being the default, each
    a core name, an import path or ``alias:path`` (team-scoped executors after ``;`` are ignored).
    Airflow matches the field against an entry's alias, path and class name.
    """
    entries = [e.strip().rpartition(":")[::2] for e in configured.split(";")[0].split(",") if e.strip()]
    if executor is None:
        return bool(entries) and _is_ours(entries[0][1])
    for alias, path in entries:
        if executor in {alias, path, path.rsplit(".", 1)[-1]} - {""}:
            return _is_ours(path)
    return _is_ours(executor)


def _is_ours(path: str) -> bool:
    return path.rsplit(".", 1)[-1] == EXECUTOR_CLASS


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def agent_verdict(
    agent: Agent,
    *,
    queue: str,
    policy: QueuePolicy | None,
    refusal: Refusal | None,
    holds_job: bool,
    now: datetime,
    window: timedelta,
) -> AgentVerdict:
    """Every reason ``agent`` cannot be handed a job of ``queue`` now (none: it can)."""
    reasons: list[Reason] = []
    online = agent.is_online(window, now)
    if agent.state == AgentStatus.REVOKED:
        reasons.append(Reason(REVOKED, "revoked: it is refused on every request and gets no jobs"))
    if queue not in agent.queues:
        granted = ", ".join(agent.queues) or "none"
        reasons.append(Reason(QUEUE_NOT_SERVED, f"queue {queue!r} is not granted to it (its queues: {granted})"))
    if policy is not None and not region_allowed(agent.region, policy.regions):
        allowed = ", ".join(policy.regions or ())
        reasons.append(
            Reason(REGION_EXCLUDED, f"region {agent.region} is excluded: queue {queue!r} may only run in {allowed}")
        )
    if refusal is not None:
        reasons.append(
            Reason(
                REFUSED,
                f"its local policy refused this task instance (try {refusal.try_number}, "
                f"{refusal.refused_at.isoformat(timespec='seconds')}): {refusal.reason or 'no reason given'}",
            )
        )
    if agent.state == AgentStatus.DRAINING:
        reasons.append(Reason(DRAINING, "draining: it takes no new jobs until 'airflow edge-agents resume'"))
    if agent.state != AgentStatus.REVOKED and not online:
        age = agent.heartbeat_age(now)
        since = "it never sent a heartbeat" if age is None else f"last heartbeat {_ago(age)} ago"
        reasons.append(Reason(OFFLINE, f"offline: {since} (limit {_ago(window.total_seconds())})"))
    # Slot counts of an offline or revoked agent are stale; the holder's own job fills a slot.
    if online and agent.state != AgentStatus.REVOKED and not holds_job and agent.slots_free <= 0:
        reasons.append(Reason(NO_FREE_SLOTS, f"no free slots: {agent.slots_total} of {agent.slots_total} busy"))
    return AgentVerdict(
        agent_id=agent.id,
        name=agent.name,
        region=agent.region,
        state=agent.state,
        online=online,
        can_take=not reasons,
        holds_job=holds_job,
        reasons=tuple(reasons),
    )


def _at(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "?"


def _job_status(job: JobFacts | None, ti: TaskFacts | None, try_number: int | None, names: Mapping[str, str],
                now: datetime) -> str:
    def who(agent_id: str | None) -> str:
        if not agent_id:
            return "no agent"
        return f"agent {names[agent_id]} ({agent_id})" if agent_id in names else f"agent {agent_id}"

    if job is None:
        if try_number is None or try_number == 0:
            return f"not queued yet: the task instance is {ti.state if ti else 'unknown'}"
        state = ti.state if ti else None
        if state in (None, "scheduled", "none", "up_for_retry", "up_for_reschedule", "deferred"):
            return f"no job for try {try_number}: the task instance is {state or 'not scheduled'}"
        return (
            f"no job for try {try_number} (the task instance is {state}): finished jobs are purged "
            "an hour after they are reported, and tries of other executors have none"
        )
    if job.state == JobStatus.QUEUED:
        return f"queued since {_at(job.queued_at)} ({_ago((now - job.queued_at).total_seconds())}): waiting for an agent"
    if job.state == JobStatus.LEASED:
        return f"leased to {who(job.agent_id)} at {_at(job.leased_at)}; it has not reported the start yet"
    if job.state == JobStatus.RUNNING:
        return f"running on {who(job.agent_id)} since {_at(job.started_at)}"
    outcome = f"{job.state} at {_at(job.finished_at)}"
    if job.agent_id:
        outcome += f" on {who(job.agent_id)}"
    if job.exit_code is not None:
        outcome += f", exit code {job.exit_code}"
    if job.reason:
        outcome += f": {job.reason}"
    return outcome


def _summary(verdicts: Sequence[AgentVerdict], queue: str, on_edge: bool, executor: str | None) -> str:
    if not on_edge:
        return f"this task instance runs on executor {executor or '(default)'}, not on edge agents"
    takers = [v for v in verdicts if v.can_take]
    if takers:
        names = ", ".join(v.name for v in takers)
        return f"{len(takers)} of {len(verdicts)} agent(s) can take it now: {names}"
    live = [v for v in verdicts if v.state != AgentStatus.REVOKED]
    if not live:
        return "no agent can take it: no agent is registered (or every one is revoked)"
    codes = [{r.code for r in v.reasons} for v in live]
    if all(QUEUE_NOT_SERVED in c for c in codes):
        return f"no agent can take it: no agent is granted queue {queue!r}"
    if all(c & {QUEUE_NOT_SERVED, REGION_EXCLUDED} for c in codes):
        return f"no agent can take it: the agents granted queue {queue!r} are all in regions its policy excludes"
    return "no agent can take it now: see the reasons per agent"


def select_try(ref: TaskRef, ti: TaskFacts | None, jobs: Sequence[JobFacts]) -> tuple[int, JobFacts | None, str]:
    """The try to explain (``ref``'s, else the current one), its job if any, and its queue.

    The queue is the job's (what leasing looks at), else the task instance's. Raises
    :class:`TaskNotFound` when there is neither a task instance nor a job.
    """
    if ti is None and not jobs:
        where = f"{ref.dag_id}/{ref.run_id}/{ref.task_id}" + (f"[{ref.map_index}]" if ref.map_index >= 0 else "")
        raise TaskNotFound(
            f"no task instance {where}: check the DAG id, task id and run id (and the map index of a mapped task)"
        )
    try_number = ref.try_number
    if try_number is None:
        try_number = ti.try_number if ti is not None else max(job.try_number for job in jobs)
    job = next((j for j in jobs if j.try_number == try_number), None)
    if job is not None:
        return try_number, job, job.queue
    return try_number, None, ti.queue if ti is not None else jobs[-1].queue


def explain(
    ref: TaskRef,
    *,
    ti: TaskFacts | None,
    jobs: Sequence[JobFacts],
    agents: Sequence[Agent],
    policy: QueuePolicy | None,
    refusals: Mapping[str, Refusal],
    configured_executors: str,
    now: datetime,
    window: timedelta = DEFAULT_DEAD_AFTER,
) -> Explanation:
    """The verdict for every agent about ``ref``, plus the state of the try's job.

    ``jobs`` are the job rows of the task instance (any try); ``policy`` is the policy of the
    queue the try runs on (its job's queue, else the task instance's); ``refusals`` are by agent id.
    Raises :class:`TaskNotFound` when there is neither a task instance nor a job.
    """
    try_number, job, queue = select_try(ref, ti, jobs)
    executor = ti.executor if ti is not None else None
    on_edge = runs_on_edge_agents(executor, configured_executors) if ti is not None else True
    holder = job.agent_id if job is not None and job.state in JobStatus.ACTIVE else None
    verdicts = tuple(
        agent_verdict(
            agent, queue=queue, policy=policy, refusal=refusals.get(agent.id), holds_job=agent.id == holder,
            now=now, window=window,
        )
        for agent in agents
    )
    names = {agent.id: agent.name for agent in agents}
    return Explanation(
        task=TaskRef(ref.dag_id, ref.task_id, ref.run_id, ref.map_index, try_number or None),
        queue=queue,
        executor=executor,
        on_edge_agents=on_edge,
        ti_state=ti.state if ti is not None else None,
        logs=log_policy(policy),
        regions=policy.regions if policy is not None else None,
        job=job,
        job_status=_job_status(job, ti, try_number, names, now),
        agents=verdicts,
        summary=_summary(verdicts, queue, on_edge, executor),
        generated_at=now,
    )


# ---------------------------------------------------------------------------------------------------
# Reads (one session; read-only)
# ---------------------------------------------------------------------------------------------------


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for UtcDateTime columns on some paths.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _task_facts(session: Session, ref: TaskRef) -> TaskFacts | None:
    from sqlalchemy import select

    from airflow.models.taskinstance import TaskInstance as TI

    row = session.execute(
        select(TI.state, TI.try_number, TI.queue, TI.executor).where(
            TI.dag_id == ref.dag_id, TI.task_id == ref.task_id, TI.run_id == ref.run_id, TI.map_index == ref.map_index
        )
    ).first()
    if row is None:
        return None
    state = row.state.value if hasattr(row.state, "value") else row.state
    return TaskFacts(state=state, try_number=row.try_number or 0, queue=row.queue, executor=row.executor)


def _jobs(session: Session, ref: TaskRef) -> list[JobFacts]:
    from sqlalchemy import select

    from executor_plugin.models import job_table

    j = job_table.c
    rows = session.execute(
        select(
            j.id, j.try_number, j.queue, j.state, j.agent_id, j.queued_at, j.leased_at, j.lease_expires_at,
            j.started_at, j.finished_at, j.exit_code, j.reason,
        )
        .where(j.dag_id == ref.dag_id, j.task_id == ref.task_id, j.run_id == ref.run_id, j.map_index == ref.map_index)
        .order_by(j.try_number, j.queued_at)
    )
    jobs = []
    for row in rows:
        values = dict(row._mapping)
        for name in ("queued_at", "leased_at", "lease_expires_at", "started_at", "finished_at"):
            values[name] = as_utc(values[name])
        jobs.append(JobFacts(**values))
    # Several rows of one try (a cancelled one, then a re-queue): the newest describes the try.
    latest: dict[int, JobFacts] = {}
    for job in jobs:
        latest[job.try_number] = job
    return list(latest.values())


def _refusals(session: Session, ref: TaskRef) -> dict[str, Refusal]:
    from sqlalchemy import select

    from executor_plugin.models import job_refusal_table

    r = job_refusal_table.c
    rows = session.execute(
        select(r.agent_id, r.try_number, r.reason, r.refused_at).where(
            r.dag_id == ref.dag_id, r.task_id == ref.task_id, r.run_id == ref.run_id, r.map_index == ref.map_index
        )
    )
    return {
        row.agent_id: Refusal(
            agent_id=row.agent_id, try_number=row.try_number, reason=row.reason, refused_at=as_utc(row.refused_at)
        )
        for row in rows
    }


def gather(
    session: Session,
    ref: TaskRef,
    *,
    configured_executors: str,
    window: timedelta = DEFAULT_DEAD_AFTER,
    now: datetime | None = None,
) -> Explanation:
    """Read what :func:`explain` needs about ``ref`` and return its answer."""
    from executor_plugin import store

    ti = _task_facts(session, ref)
    jobs = _jobs(session, ref)
    _, _, queue = select_try(ref, ti, jobs)
    return explain(
        ref,
        ti=ti,
        jobs=jobs,
        agents=store.list_agents(session),
        policy=store.get_queue_policy(session, queue),
        refusals=_refusals(session, ref),
        configured_executors=configured_executors,
        now=now or store.utcnow(),
        window=window,
    )


__all__ = [
    "AgentVerdict",
    "DEFAULT_DEAD_AFTER",
    "Explanation",
    "ExplainError",
    "JobFacts",
    "Reason",
    "Refusal",
    "TaskFacts",
    "TaskNotFound",
    "TaskRef",
    "agent_verdict",
    "as_utc",
    "explain",
    "gather",
    "jsonable",
    "runs_on_edge_agents",
    "select_try",
]
