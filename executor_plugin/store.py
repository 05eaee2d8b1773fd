"""Every query and transaction of the hosted side.

The executor, the gateway and the admin commands call these functions; none of them writes SQL.
Functions take a SQLAlchemy session and leave the commit to the caller, except where the docstring
says otherwise (leasing commits, because its compare-and-set must be visible at once).

Concurrency: a job moves out of QUEUED only through :func:`lease_next`, an ``UPDATE ... WHERE
state = 'queued' AND fencing = <seen>`` compare-and-set, so two gateways (or two requests in one
gateway) can never lease one job twice; the loser simply tries the next candidate. On PostgreSQL the
candidate scan uses ``FOR UPDATE SKIP LOCKED`` so concurrent leasers do not queue behind each other.

Liveness: an agent is *online* while its last heartbeat is younger than ``[edge_agent]
agent_dead_after_seconds``. The executor requeues the leased jobs of an agent that is not
(:func:`requeue_leased_of_offline_agents`) and closes its running jobs once Airflow has settled
their task instances (:func:`close_running_jobs_of_offline_agents`); both re-check the agent in
the UPDATE itself, so a heartbeat that lands in between wins. On PostgreSQL their scans skip rows
another scheduler has locked.

Isolation: what an agent may lease is computed at lease time from its row (queues and region from
its registration token) and the queue policies (:mod:`executor_plugin.policy` decides), minus the
task instances it refused; a policy change or a revocation applies to the next lease at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session

from executor_plugin.models import (
    AgentStatus,
    JobStatus,
    agent_table,
    job_refusal_table,
    job_table,
    queue_policy_table,
    token_table,
)
from executor_plugin.policy import LOGS_HOSTED, QueuePolicy, could_serve, servable_queues

#: Candidates examined per lease attempt; more than one so a lost compare-and-set race moves on.
_LEASE_CANDIDATES = 8


#: A job handed back to the queue: no holder, and a new fencing id so the old holder's late
#: reports are refused.
_BACK_TO_QUEUE = dict(
    state=JobStatus.QUEUED,
    agent_id=None,
    leased_at=None,
    lease_expires_at=None,
    fencing=job_table.c.fencing + 1,
)


class StoreError(Exception):
    """Base of the store's refusals; the gateway maps each to an HTTP status."""


class TokenRejected(StoreError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JobNotFound(StoreError):
    """No such job, or it belongs to another agent (the two are not distinguished, on purpose)."""


class StaleFencing(StoreError):
    """The caller's fencing id is not the job's current one: its lease ended or was handed on."""


class AgentNotFound(StoreError):
    """No agent with this id."""


class AgentRevoked(StoreError):
    """The agent is revoked: nothing about it may change any more (register a new one)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for UtcDateTime columns in some paths.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True)
class Job:
    id: str
    ti_id: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    queue: str
    priority_weight: int
    workload: str
    state: str
    agent_id: str | None
    fencing: int
    queued_at: datetime
    leased_at: datetime | None
    lease_expires_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    reason: str | None
    reported_state: str | None

    @property
    def key_tuple(self) -> tuple[str, str, str, int, int]:
        return (self.dag_id, self.task_id, self.run_id, self.map_index, self.try_number)

    @property
    def changed_at(self) -> datetime:
        """When the job reached its current state (the age of its pending scheduler event)."""
        return self.finished_at or self.started_at or self.leased_at or self.queued_at

    @classmethod
    def _from_row(cls, row) -> "Job":
        values = dict(row._mapping)
        for name in ("queued_at", "leased_at", "lease_expires_at", "started_at", "finished_at"):
            values[name] = _aware(values[name])
        return cls(**values)


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    queues: tuple[str, ...]
    region: str
    state: str
    token_id: str
    pubkey_fp: str
    cert_serial: str | None
    cert_not_after: datetime | None
    #: SPKI pin (hex) of the CA that issued the agent's latest certificate (None: issued before 0002).
    cert_issuer: str | None
    slots_total: int
    slots_free: int
    version: str | None
    created_at: datetime
    last_heartbeat: datetime | None

    def heartbeat_age(self, now: datetime | None = None) -> float | None:
        """Seconds since the last heartbeat (0 if the clocks disagree), None if it never sent one."""
        if self.last_heartbeat is None:
            return None
        return max(0.0, ((now or utcnow()) - self.last_heartbeat).total_seconds())

    def is_online(self, dead_after: timedelta, now: datetime | None = None) -> bool:
        """Online iff the last heartbeat is within ``dead_after`` (the executor's rule, in Python)."""
        age = self.heartbeat_age(now)
        return age is not None and age <= dead_after.total_seconds()

    @classmethod
    def _from_row(cls, row) -> "Agent":
        values = dict(row._mapping)
        values["queues"] = tuple(json.loads(values["queues"]))
        for name in ("cert_not_after", "created_at", "last_heartbeat"):
            values[name] = _aware(values[name])
        return cls(**values)


@dataclass(frozen=True)
class Token:
    id: str
    queues: tuple[str, ...]
    region: str
    name: str | None
    created_at: datetime
    expires_at: datetime
    max_uses: int
    uses: int

    @classmethod
    def _from_row(cls, row) -> "Token":
        values = dict(row._mapping)
        values.pop("secret_hash", None)
        values["queues"] = tuple(json.loads(values["queues"]))
        for name in ("created_at", "expires_at"):
            values[name] = _aware(values[name])
        return cls(**values)


def hash_secret(secret: str) -> str:
    """SHA-256 is enough: the secret carries 128 random bits, there is nothing to brute-force."""
    return hashlib.sha256(secret.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Executor side (runs in the scheduler)
# ---------------------------------------------------------------------------------------------------


def enqueue_job(
    session: Session,
    *,
    workload_json: str,
    ti_id: str,
    dag_id: str,
    task_id: str,
    run_id: str,
    map_index: int,
    try_number: int,
    queue: str,
    priority_weight: int,
    now: datetime | None = None,
) -> str:
    """Add a QUEUED job in the caller's transaction (the scheduler's, atomic with the TI state).

    A job still open for the same try (a re-queue after a scheduler restart) is replaced, so one
    try never has two live jobs.
    """
    key = (dag_id, task_id, run_id, map_index, try_number)
    session.execute(
        delete(job_table).where(
            _key_clause(key), job_table.c.state == JobStatus.QUEUED
        )
    )
    job_id = uuid.uuid4().hex
    session.execute(
        insert(job_table).values(
            id=job_id,
            ti_id=ti_id,
            dag_id=dag_id,
            task_id=task_id,
            run_id=run_id,
            map_index=map_index,
            try_number=try_number,
            queue=queue,
            priority_weight=priority_weight,
            workload=workload_json,
            state=JobStatus.QUEUED,
            fencing=0,
            queued_at=now or utcnow(),
        )
    )
    from executor_plugin.gateway.job_channel import announce_queued  # PostgreSQL: NOTIFY at commit

    announce_queued(session, queue)
    return job_id


def _key_clause(key: tuple[str, str, str, int, int]):
    dag_id, task_id, run_id, map_index, try_number = key
    return and_(
        job_table.c.dag_id == dag_id,
        job_table.c.task_id == task_id,
        job_table.c.run_id == run_id,
        job_table.c.map_index == map_index,
        job_table.c.try_number == try_number,
    )


def pending_events(session: Session) -> list[Job]:
    """Jobs whose state changed since the executor last turned it into a scheduler event."""
    rows = session.execute(
        select(job_table).where(
            job_table.c.state.in_((JobStatus.RUNNING, JobStatus.SUCCESS, JobStatus.FAILED)),
            or_(job_table.c.reported_state.is_(None), job_table.c.reported_state != job_table.c.state),
        )
    )
    return [Job._from_row(r) for r in rows]


def mark_reported(session: Session, job_id: str, state: str) -> None:
    session.execute(update(job_table).where(job_table.c.id == job_id).values(reported_state=state))


def cancel_job(
    session: Session, *, dag_id: str, task_id: str, run_id: str, map_index: int, try_number: int
) -> bool:
    """Cancel the open job of a try. A leased or running one loses its lease at the next heartbeat."""
    result = session.execute(
        update(job_table)
        .where(
            _key_clause((dag_id, task_id, run_id, map_index, try_number)),
            job_table.c.state.in_((JobStatus.QUEUED, *JobStatus.ACTIVE)),
        )
        .values(
            state=JobStatus.CANCELLED,
            reported_state=JobStatus.CANCELLED,
            fencing=job_table.c.fencing + 1,
            finished_at=utcnow(),
            reason="revoked by the scheduler",
        )
    )
    return result.rowcount > 0


def jobs_for_keys(session: Session, keys: Iterable[tuple[str, str, str, int, int]]) -> list[Job]:
    """Jobs of these tries that the executor still has to follow (for adoption after a restart)."""
    keys = list(keys)
    if not keys:
        return []
    cols = (
        job_table.c.dag_id,
        job_table.c.task_id,
        job_table.c.run_id,
        job_table.c.map_index,
        job_table.c.try_number,
    )
    found: list[Job] = []
    # Chunked: SQLite limits the number of bound parameters per statement.
    for start in range(0, len(keys), 100):
        rows = session.execute(
            select(job_table).where(
                tuple_(*cols).in_(keys[start : start + 100]),
                # Open jobs, and finished ones whose outcome the executor has not reported yet
                # (the scheduler died in between): adopting those avoids running the try again.
                or_(
                    job_table.c.state.notin_(JobStatus.TERMINAL),
                    job_table.c.reported_state.is_(None),
                    job_table.c.reported_state != job_table.c.state,
                ),
            )
        )
        found.extend(Job._from_row(r) for r in rows)
    return found


def requeue_expired_leases(session: Session, now: datetime | None = None) -> int:
    """Put back jobs leased but never confirmed started before their lease lapsed.

    The fencing id is bumped so a late report from the agent that lost the lease is refused.
    Started jobs are left alone: Airflow's own task heartbeat timeout decides about those.
    """
    result = session.execute(
        update(job_table)
        .where(job_table.c.state == JobStatus.LEASED, job_table.c.lease_expires_at < (now or utcnow()))
        .values(**_BACK_TO_QUEUE)
    )
    return result.rowcount


def _ti_states(session: Session, ti_ids: Sequence[str]) -> dict[str, tuple[str | None, int]]:
    """(state, try_number) of Airflow's task instances by id; ids with no row are left out."""
    from airflow.models.taskinstance import TaskInstance

    live: dict[str, tuple[str | None, int]] = {}
    ids = list(dict.fromkeys(ti_ids))
    # Chunked: SQLite limits the number of bound parameters per statement.
    for start in range(0, len(ids), 500):
        wanted = [uuid.UUID(ti_id) for ti_id in ids[start : start + 500]]
        rows = session.execute(
            select(TaskInstance.id, TaskInstance.state, TaskInstance.try_number).where(TaskInstance.id.in_(wanted))
        )
        live.update({str(ti_id): (state, try_number) for ti_id, state, try_number in rows})
    return live


def cancel_queued_jobs_of_settled_tis(session: Session, now: datetime | None = None) -> int:
    """Cancel queued jobs whose task instance is no longer QUEUED for that try.

    An operator can settle a queued TI by hand (mark the run failed, clear it, delete the run); the
    scheduler does not revoke the job then, and an agent would later lease a try Airflow has moved
    past. Jobs and TIs are matched by the TI's id and try number.
    """
    from airflow.utils.state import TaskInstanceState

    queued = session.execute(
        select(job_table.c.id, job_table.c.ti_id, job_table.c.try_number).where(job_table.c.state == JobStatus.QUEUED)
    ).all()
    if not queued:
        return 0
    live = _ti_states(session, [row.ti_id for row in queued])
    settled = [row.id for row in queued if live.get(row.ti_id) != (TaskInstanceState.QUEUED, row.try_number)]
    if not settled:
        return 0
    result = session.execute(
        update(job_table)
        .where(job_table.c.id.in_(settled), job_table.c.state == JobStatus.QUEUED)
        .values(
            state=JobStatus.CANCELLED,
            reported_state=JobStatus.CANCELLED,
            fencing=job_table.c.fencing + 1,
            finished_at=now or utcnow(),
            reason="task instance is no longer queued for this try",
        )
    )
    return result.rowcount


# -- agents that stopped heartbeating -----------------------------------------------------------------


def _silent_since(cutoff: datetime):
    """SQL condition on the agent table: no heartbeat since ``cutoff`` (or never one)."""
    return or_(agent_table.c.last_heartbeat.is_(None), agent_table.c.last_heartbeat < cutoff)


def _still_silent(agent_id: str, cutoff: datetime):
    """SQL condition re-checked inside an UPDATE: a heartbeat that landed since the scan wins."""
    return select(agent_table.c.id).where(agent_table.c.id == agent_id, _silent_since(cutoff)).exists()


def _lock_skipping(session: Session, query):
    """``FOR UPDATE OF job SKIP LOCKED`` on PostgreSQL: two schedulers sweeping at once take disjoint
    rows instead of waiting on (or deadlocking against) each other. SQLite has one writer anyway."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(of=job_table, skip_locked=True)
    return query


@dataclass(frozen=True)
class OfflineRequeue:
    """Leased jobs of one offline agent that went back to the queue."""

    agent_id: str
    agent_name: str
    #: Seconds since the agent's last sign of life (its last heartbeat, or its latest lease).
    silent_for: float
    requeued: int


def requeue_leased_of_offline_agents(
    session: Session, *, dead_after: timedelta, now: datetime | None = None
) -> list[OfflineRequeue]:
    """Put back the leased (not started) jobs of agents with no heartbeat for ``dead_after``.

    The fencing id is bumped, so the old holder's late RUNNING report is refused and its next
    heartbeat names the job in ``lost``. A job leased within the window is kept even if the
    agent's last heartbeat is older: the lease itself shows the agent was alive then (an agent
    that just started may lease before its first heartbeat lands). The lease-TTL requeue
    (:func:`requeue_expired_leases`) stays as the fallback. Running jobs are not touched here.
    """
    now = now or utcnow()
    cutoff = now - dead_after
    j, a = job_table.c, agent_table.c
    rows = session.execute(
        _lock_skipping(
            session,
            select(j.id, j.agent_id, j.leased_at, a.name, a.last_heartbeat)
            .join(agent_table, a.id == j.agent_id)
            .where(j.state == JobStatus.LEASED, j.leased_at < cutoff, _silent_since(cutoff))
            .order_by(j.id),
        )
    ).all()
    by_agent: dict[str, list] = {}
    for row in rows:
        by_agent.setdefault(row.agent_id, []).append(row)
    requeues: list[OfflineRequeue] = []
    for agent_id, found in by_agent.items():
        ids = [row.id for row in found]
        count = 0
        for start in range(0, len(ids), 500):
            result = session.execute(
                update(job_table)
                .where(
                    j.id.in_(ids[start : start + 500]),
                    j.agent_id == agent_id,
                    j.state == JobStatus.LEASED,
                    j.leased_at < cutoff,
                    _still_silent(agent_id, cutoff),
                )
                .values(**_BACK_TO_QUEUE)
            )
            count += result.rowcount
        if count:
            signs = [_aware(found[0].last_heartbeat), *(_aware(row.leased_at) for row in found)]
            last_seen = max(t for t in signs if t is not None)
            requeues.append(
                OfflineRequeue(
                    agent_id=agent_id,
                    agent_name=found[0].name,
                    silent_for=(now - last_seen).total_seconds(),
                    requeued=count,
                )
            )
    return requeues


@dataclass(frozen=True)
class ClosedJob:
    """A running job of an offline agent, closed because Airflow had settled its task instance."""

    job: Job
    agent_name: str


def _settled(ti: tuple[str | None, int] | None, try_number: int) -> str | None:
    """Why Airflow is done with this try, or None while it may still run (QUEUED/RUNNING/RESTARTING).

    QUEUED counts as not settled: an agent cut off after it started the supervisor but before the
    task reached Airflow may still run it when the network comes back, and if it is really dead,
    Airflow's ``task_queued_timeout`` revokes the try (``revoke_task`` cancels the job).
    """
    from airflow.utils.state import TaskInstanceState

    if ti is None:
        return "the task instance moved on to another try (or its run was deleted)"
    state, current_try = ti
    if current_try != try_number:
        return f"the task instance is on try {current_try} now"
    if state in (TaskInstanceState.QUEUED, TaskInstanceState.RUNNING, TaskInstanceState.RESTARTING):
        return None
    return f"Airflow settled the task instance as {state or 'none'}"


def close_running_jobs_of_offline_agents(
    session: Session, *, dead_after: timedelta, now: datetime | None = None
) -> list[ClosedJob]:
    """Close the running jobs of offline agents whose task instance Airflow has settled.

    A started job of a dead agent is left to Airflow (its task heartbeat timeout fails or retries
    the try); once Airflow has moved on, the job would otherwise stay RUNNING for ever: counted as
    running, holding the try's key in the executor (a parallelism slot, when the TI ended without
    the timeout path, e.g. the task reported success and then the agent died), never purged. It is
    closed as ``success`` when the TI succeeded, else ``failed``, with a reason; ``reported_state``
    is set, so it is no scheduler event, and the fencing id is bumped, so the agent's late report
    is refused. Jobs of online agents are never touched (their own final report must land), nor
    jobs started within the window.
    """
    from airflow.utils.state import TaskInstanceState

    now = now or utcnow()
    cutoff = now - dead_after
    j, a = job_table.c, agent_table.c
    rows = session.execute(
        _lock_skipping(
            session,
            select(job_table, a.name.label("agent_name"))
            .join(agent_table, a.id == j.agent_id)
            .where(
                j.state == JobStatus.RUNNING,
                or_(j.started_at.is_(None), j.started_at < cutoff),
                _silent_since(cutoff),
            )
            .order_by(j.id),
        )
    ).all()
    if not rows:
        return []
    live = _ti_states(session, [row.ti_id for row in rows])
    closed: list[ClosedJob] = []
    for row in rows:
        ti = live.get(row.ti_id)
        why = _settled(ti, row.try_number)
        if why is None:
            continue
        state = JobStatus.SUCCESS if ti == (TaskInstanceState.SUCCESS, row.try_number) else JobStatus.FAILED
        result = session.execute(
            update(job_table)
            .where(
                j.id == row.id,
                j.state == JobStatus.RUNNING,
                j.fencing == row.fencing,
                j.agent_id == row.agent_id,
                _still_silent(row.agent_id, cutoff),
            )
            .values(
                state=state,
                reported_state=state,
                fencing=j.fencing + 1,
                finished_at=now,
                reason=f"agent {row.agent_name} ({row.agent_id}) went offline; {why}",
            )
        )
        if result.rowcount == 1:
            job = Job._from_row(session.execute(select(job_table).where(j.id == row.id)).one())
            closed.append(ClosedJob(job=job, agent_name=row.agent_name))
    return closed


def purge_reported(session: Session, older_than: datetime) -> int:
    result = session.execute(
        delete(job_table).where(
            job_table.c.state.in_(JobStatus.TERMINAL),
            job_table.c.reported_state == job_table.c.state,
            job_table.c.finished_at < older_than,
        )
    )
    return result.rowcount


# ---------------------------------------------------------------------------------------------------
# Tokens and agents
# ---------------------------------------------------------------------------------------------------


def create_token(
    session: Session,
    *,
    token_id: str,
    secret_hash: str,
    queues: Sequence[str],
    region: str,
    name: str | None,
    ttl: timedelta,
    max_uses: int,
    now: datetime | None = None,
) -> Token:
    now = now or utcnow()
    values = dict(
        id=token_id,
        secret_hash=secret_hash,
        queues=json.dumps(list(queues)),
        region=region,
        name=name,
        created_at=now,
        expires_at=now + ttl,
        max_uses=max_uses,
        uses=0,
    )
    session.execute(insert(token_table).values(**values))
    return Token._from_row(_FakeRow(values))


class _FakeRow:
    def __init__(self, mapping: dict):
        self._mapping = mapping


def redeem_token(
    session: Session, *, token_id: str, secret: str, pubkey_fp: str, now: datetime | None = None
) -> tuple[Token, Agent | None]:
    """Check a registration token; return it and, on a retry with the same key, the agent it made.

    A lost registration response is safe to retry: the same token with the same key finds the agent
    created the first time. Another key on a used-up token is refused.
    """
    row = session.execute(select(token_table).where(token_table.c.id == token_id)).first()
    if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
        raise TokenRejected("registration token unknown or revoked")
    token = Token._from_row(row)
    existing = session.execute(
        select(agent_table).where(agent_table.c.token_id == token_id, agent_table.c.pubkey_fp == pubkey_fp)
    ).first()
    if existing is not None:
        agent = Agent._from_row(existing)
        if agent.state == AgentStatus.REVOKED:
            raise TokenRejected("the agent registered with this token was revoked")
        return token, agent
    if token.expires_at <= (now or utcnow()):
        raise TokenRejected("registration token expired: mint a new one with 'airflow edge-agents token create'")
    if token.uses >= token.max_uses:
        raise TokenRejected("registration token already used: mint a new one with 'airflow edge-agents token create'")
    return token, None


def create_agent(
    session: Session, *, agent_id: str, name: str, token: Token, pubkey_fp: str, now: datetime | None = None
) -> Agent:
    """Create an agent bound to the token's queues and region, consuming one use of the token.

    The use is counted with a guarded UPDATE so two concurrent registrations cannot both take the
    last use.
    """
    consumed = session.execute(
        update(token_table)
        .where(token_table.c.id == token.id, token_table.c.uses < token_table.c.max_uses)
        .values(uses=token_table.c.uses + 1)
    )
    if consumed.rowcount != 1:
        raise TokenRejected("registration token already used: mint a new one with 'airflow edge-agents token create'")
    values = dict(
        id=agent_id,
        name=name,
        queues=json.dumps(list(token.queues)),
        region=token.region,
        state=AgentStatus.ACTIVE,
        token_id=token.id,
        pubkey_fp=pubkey_fp,
        cert_serial=None,
        cert_not_after=None,
        cert_issuer=None,
        slots_total=0,
        slots_free=0,
        version=None,
        created_at=now or utcnow(),
        last_heartbeat=None,
    )
    session.execute(insert(agent_table).values(**values))
    return Agent._from_row(_FakeRow(values))


def set_agent_cert(
    session: Session, agent_id: str, *, serial: str, not_after: datetime, issuer: str | None = None
) -> None:
    session.execute(
        update(agent_table)
        .where(agent_table.c.id == agent_id)
        .values(cert_serial=serial, cert_not_after=not_after, cert_issuer=issuer)
    )


def renew_agent_cert(
    session: Session, agent_id: str, *, serial: str, not_after: datetime, issuer: str, pubkey_fp: str
) -> Agent:
    """Record a renewed certificate (new key) of an agent that is not revoked; returns the agent.

    The guarded UPDATE refuses a revocation that landed after the caller authenticated, so a
    certificate signed in that window is never handed out.
    """
    result = session.execute(
        update(agent_table)
        .where(agent_table.c.id == agent_id, agent_table.c.state != AgentStatus.REVOKED)
        .values(cert_serial=serial, cert_not_after=not_after, cert_issuer=issuer, pubkey_fp=pubkey_fp)
    )
    agent = get_agent(session, agent_id)
    if agent is None:
        raise AgentNotFound(agent_id)
    if result.rowcount != 1:
        raise AgentRevoked(f"agent {agent_id} is revoked")
    return agent


def get_agent(session: Session, agent_id: str) -> Agent | None:
    row = session.execute(select(agent_table).where(agent_table.c.id == agent_id)).first()
    return Agent._from_row(row) if row is not None else None


def list_agents(session: Session) -> list[Agent]:
    rows = session.execute(select(agent_table).order_by(agent_table.c.created_at))
    return [Agent._from_row(r) for r in rows]


def _requeue_leased_of(session: Session, agent_id: str) -> int:
    result = session.execute(
        update(job_table)
        .where(job_table.c.agent_id == agent_id, job_table.c.state == JobStatus.LEASED)
        .values(**_BACK_TO_QUEUE)
    )
    return result.rowcount


@dataclass(frozen=True)
class Revocation:
    agent: Agent
    #: Leased jobs the agent had not started: back in the queue for other agents.
    requeued: int
    #: Jobs the agent runs: left to Airflow's task heartbeat timeout (the gateway refuses their
    #: Execution API calls from now on, so the tasks cannot report and die quickly).
    running: tuple[str, ...]


def revoke_agent(session: Session, agent_id: str) -> Revocation:
    """Revoke an agent: every later request with its certificate is refused (403). Idempotent.

    Its leased jobs are requeued at once; its running jobs are left to Airflow.
    """
    if get_agent(session, agent_id) is None:
        raise AgentNotFound(agent_id)
    session.execute(update(agent_table).where(agent_table.c.id == agent_id).values(state=AgentStatus.REVOKED))
    requeued = _requeue_leased_of(session, agent_id)
    running = session.execute(
        select(job_table.c.id).where(job_table.c.agent_id == agent_id, job_table.c.state == JobStatus.RUNNING)
    ).scalars()
    agent = get_agent(session, agent_id)
    assert agent is not None
    return Revocation(agent=agent, requeued=requeued, running=tuple(sorted(running)))


def _set_agent_state(session: Session, agent_id: str, state: str) -> Agent:
    result = session.execute(
        update(agent_table)
        .where(agent_table.c.id == agent_id, agent_table.c.state != AgentStatus.REVOKED)
        .values(state=state)
    )
    agent = get_agent(session, agent_id)
    if agent is None:
        raise AgentNotFound(agent_id)
    if result.rowcount != 1:
        raise AgentRevoked(f"agent {agent_id} is revoked; register a new agent instead")
    return agent


def drain_agent(session: Session, agent_id: str) -> Agent:
    """Stop handing the agent new jobs; its heartbeat reply asks it to drain. Idempotent."""
    return _set_agent_state(session, agent_id, AgentStatus.DRAINING)


def resume_agent(session: Session, agent_id: str) -> Agent:
    """Undo :func:`drain_agent`. A revoked agent cannot be resumed (:class:`AgentRevoked`)."""
    return _set_agent_state(session, agent_id, AgentStatus.ACTIVE)


def running_job_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(job_table.c.agent_id, func.count())
        .where(job_table.c.state.in_(JobStatus.ACTIVE), job_table.c.agent_id.is_not(None))
        .group_by(job_table.c.agent_id)
    )
    return {agent_id: count for agent_id, count in rows}


def record_heartbeat(
    session: Session,
    agent_id: str,
    *,
    free_slots: int,
    total_slots: int,
    version: str,
    cert_not_after: datetime | None,
    running: Sequence[tuple[str, int]],
    lease_ttl: timedelta,
    now: datetime | None = None,
) -> list[str]:
    """Record liveness and renew the leases of every job the agent still holds, in one statement.

    Returns the ids the agent reported that it no longer holds (cancelled, requeued, stale fencing),
    so the agent can stop them.
    """
    now = now or utcnow()
    session.execute(
        update(agent_table)
        .where(agent_table.c.id == agent_id)
        .values(
            last_heartbeat=now,
            slots_free=free_slots,
            slots_total=total_slots,
            version=version,
            **({"cert_not_after": cert_not_after} if cert_not_after else {}),
        )
    )
    if not running:
        return []
    wanted = {job_id: fencing for job_id, fencing in running}
    held = session.execute(
        select(job_table.c.id, job_table.c.fencing).where(
            job_table.c.id.in_(list(wanted)),
            job_table.c.agent_id == agent_id,
            job_table.c.state.in_(JobStatus.ACTIVE),
        )
    ).all()
    still_held = [job_id for job_id, fencing in held if wanted.get(job_id) == fencing]
    if still_held:
        session.execute(
            update(job_table)
            .where(job_table.c.id.in_(still_held), job_table.c.agent_id == agent_id)
            .values(lease_expires_at=now + lease_ttl)
        )
    return sorted(set(wanted) - set(still_held))


# ---------------------------------------------------------------------------------------------------
# Queue policies
# ---------------------------------------------------------------------------------------------------


def _policy_from_row(row) -> QueuePolicy:
    regions = json.loads(row.regions) if row.regions is not None else None
    return QueuePolicy(
        queue=row.queue,
        regions=tuple(regions) if regions is not None else None,
        logs=row.logs,
        updated_at=_aware(row.updated_at),
    )


def get_queue_policy(session: Session, queue: str) -> QueuePolicy | None:
    row = session.execute(select(queue_policy_table).where(queue_policy_table.c.queue == queue)).first()
    return _policy_from_row(row) if row is not None else None


def queue_policies(session: Session, queues: Iterable[str] | None = None) -> dict[str, QueuePolicy]:
    """Policies by queue: of ``queues`` (those that have one), or of every queue when None."""
    query = select(queue_policy_table)
    if queues is not None:
        wanted = list(queues)
        if not wanted:
            return {}
        query = query.where(queue_policy_table.c.queue.in_(wanted))
    return {row.queue: _policy_from_row(row) for row in session.execute(query)}


def list_queue_policies(session: Session) -> list[QueuePolicy]:
    return sorted(queue_policies(session).values(), key=lambda policy: policy.queue)


def set_queue_policy(
    session: Session,
    queue: str,
    *,
    regions: Sequence[str] | None = None,
    logs: str | None = None,
    now: datetime | None = None,
) -> QueuePolicy:
    """Create or change a queue's policy. ``None`` keeps a field as it is (new policy: any region,
    logs hosted). Patterns are stored as given: validate them with ``policy.validate_*`` first."""
    now = now or utcnow()
    current = get_queue_policy(session, queue)
    values: dict = {"updated_at": now}
    if regions is not None:
        values["regions"] = json.dumps(list(regions))
    if logs is not None:
        values["logs"] = logs
    if current is None:
        values.setdefault("regions", None)
        values.setdefault("logs", LOGS_HOSTED)
        session.execute(insert(queue_policy_table).values(queue=queue, **values))
    else:
        session.execute(update(queue_policy_table).where(queue_policy_table.c.queue == queue).values(**values))
    policy = get_queue_policy(session, queue)
    assert policy is not None
    return policy


def delete_queue_policy(session: Session, queue: str) -> bool:
    result = session.execute(delete(queue_policy_table).where(queue_policy_table.c.queue == queue))
    return result.rowcount > 0


def eligible_queues(session: Session, agent: Agent) -> tuple[str, ...]:
    """The agent's granted queues that their policies let it serve from its region."""
    return servable_queues(agent, queue_policies(session, agent.queues))


# ---------------------------------------------------------------------------------------------------
# Leasing (gateway)
# ---------------------------------------------------------------------------------------------------


def _not_refused_by(agent_id: str):
    """SQL condition: the job's task instance was not refused by ``agent_id``."""
    r = job_refusal_table.c
    return ~(
        select(r.agent_id)
        .where(
            r.agent_id == agent_id,
            r.dag_id == job_table.c.dag_id,
            r.task_id == job_table.c.task_id,
            r.run_id == job_table.c.run_id,
            r.map_index == job_table.c.map_index,
        )
        .exists()
    )


def queued_exists(session: Session, queues: Sequence[str], *, refused_by: str | None = None) -> bool:
    """Is a job queued on ``queues``? With ``refused_by``, ignore the task instances that agent refused."""
    if not queues:
        return False
    query = select(job_table.c.id).where(job_table.c.state == JobStatus.QUEUED, job_table.c.queue.in_(list(queues)))
    if refused_by is not None:
        query = query.where(_not_refused_by(refused_by))
    return session.execute(query.limit(1)).first() is not None


def lease_next(session: Session, agent: Agent, *, lease_ttl: timedelta, now: datetime | None = None) -> Job | None:
    """Lease the most urgent job the agent may serve; commits.

    Eligibility is decided here from the agent's row as stored now (not the caller's copy, so a
    revocation or drain since the caller read it applies), the queue policies of its granted
    queues, and its refusals. Returns None when nothing is eligible or every candidate was taken
    by a concurrent leaser.
    """
    if agent.state != AgentStatus.ACTIVE:
        return None
    now = now or utcnow()
    fresh = get_agent(session, agent.id)
    queues = eligible_queues(session, fresh) if fresh is not None and fresh.state == AgentStatus.ACTIVE else ()
    if not queues:
        session.commit()
        return None
    candidates_q = (
        select(job_table.c.id, job_table.c.fencing)
        .where(
            job_table.c.state == JobStatus.QUEUED,
            job_table.c.queue.in_(list(queues)),
            _not_refused_by(agent.id),
        )
        .order_by(job_table.c.priority_weight.desc(), job_table.c.queued_at)
        .limit(_LEASE_CANDIDATES)
    )
    if session.get_bind().dialect.name == "postgresql":
        candidates_q = candidates_q.with_for_update(skip_locked=True)
    candidates = session.execute(candidates_q).all()
    for job_id, fencing in candidates:
        won = session.execute(
            update(job_table)
            .where(job_table.c.id == job_id, job_table.c.state == JobStatus.QUEUED, job_table.c.fencing == fencing)
            .values(
                state=JobStatus.LEASED,
                agent_id=agent.id,
                fencing=fencing + 1,
                leased_at=now,
                lease_expires_at=now + lease_ttl,
            )
        )
        if won.rowcount == 1:
            row = session.execute(select(job_table).where(job_table.c.id == job_id)).one()
            session.commit()
            return Job._from_row(row)
    session.commit()
    return None


def job_for_agent(session: Session, agent_id: str, job_id: str, fencing: int) -> Job:
    row = session.execute(select(job_table).where(job_table.c.id == job_id)).first()
    if row is None or row.agent_id != agent_id:
        raise JobNotFound(job_id)
    if row.fencing != fencing:
        raise StaleFencing(job_id)
    return Job._from_row(row)


def agent_holds_ti(session: Session, agent_id: str, ti_id: str) -> bool:
    """Does the agent hold a leased or running job of this task instance (Execution API binding)?"""
    row = session.execute(
        select(job_table.c.id)
        .where(
            job_table.c.agent_id == agent_id,
            job_table.c.state.in_(JobStatus.ACTIVE),
            job_table.c.ti_id == ti_id,
        )
        .limit(1)
    ).first()
    return row is not None


#: The report an agent sends when its local policy refuses a job (``protocol.JobState.REFUSED``).
REFUSED = "refused"


_ALLOWED_REPORTS = {
    JobStatus.RUNNING: (JobStatus.LEASED, JobStatus.RUNNING),
    JobStatus.SUCCESS: (JobStatus.LEASED, JobStatus.RUNNING, JobStatus.SUCCESS),
    JobStatus.FAILED: (JobStatus.LEASED, JobStatus.RUNNING, JobStatus.FAILED),
}


def report_job(
    session: Session,
    agent_id: str,
    job_id: str,
    fencing: int,
    state: str,
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> Job:
    """Record an agent's report about a job it holds. Repeating the same report is harmless.

    ``state="refused"`` is handed to :func:`refuse_job` (``reason`` says why).
    """
    if state == REFUSED:
        return refuse_job(session, agent_id, job_id, fencing, reason=reason, now=now)
    job = job_for_agent(session, agent_id, job_id, fencing)
    if state not in _ALLOWED_REPORTS:
        raise ValueError(f"unknown job state {state!r}")
    if job.state not in _ALLOWED_REPORTS[state]:
        # E.g. cancelled by the scheduler, or a terminal job reported again with another outcome.
        raise StaleFencing(job_id)
    if job.state == state:
        return job
    now = now or utcnow()
    values: dict = {"state": state}
    if state == JobStatus.RUNNING:
        values["started_at"] = now
    else:
        values.update(finished_at=now, exit_code=exit_code, reason=reason)
        if job.started_at is None:
            values["started_at"] = now
    session.execute(
        update(job_table).where(job_table.c.id == job_id, job_table.c.fencing == fencing).values(**values)
    )
    row = session.execute(select(job_table).where(job_table.c.id == job_id)).one()
    return Job._from_row(row)


def refuse_job(
    session: Session, agent_id: str, job_id: str, fencing: int, *, reason: str | None, now: datetime | None = None
) -> Job:
    """The agent's local policy refused a leased job: it never ran. Returns the job as it is now.

    The refusal is recorded for the task instance, so no lease offers it (nor a retry of it) to this
    agent again. The job goes back to the queue when another agent could take it (one that is
    active or draining, granted the queue, in a region its policy admits, and that has not refused
    it); otherwise it fails with the reason, so the task does not wait in the queue for
    ``[scheduler] task_queued_timeout`` with nobody to run it. A requeued job is no scheduler event.

    Repeating the same report (its response was lost) returns the job without a change.
    """
    now = now or utcnow()
    r = job_refusal_table.c
    row = session.execute(select(job_table).where(job_table.c.id == job_id)).first()
    if row is None:
        raise JobNotFound(job_id)
    ti_key = and_(
        r.dag_id == row.dag_id, r.task_id == row.task_id, r.run_id == row.run_id, r.map_index == row.map_index
    )
    earlier = session.execute(select(job_refusal_table).where(ti_key, r.agent_id == agent_id)).first()
    if earlier is not None and (earlier.job_id, earlier.fencing) == (job_id, fencing):
        return Job._from_row(row)
    job = job_for_agent(session, agent_id, job_id, fencing)
    if job.state != JobStatus.LEASED:
        # Started, finished or cancelled: too late to refuse.
        raise StaleFencing(job_id)
    values = dict(job_id=job_id, fencing=fencing, try_number=job.try_number, reason=reason, refused_at=now)
    if earlier is None:
        session.execute(
            insert(job_refusal_table).values(
                agent_id=agent_id, dag_id=job.dag_id, task_id=job.task_id, run_id=job.run_id,
                map_index=job.map_index, **values,
            )
        )
    else:
        session.execute(update(job_refusal_table).where(ti_key, r.agent_id == agent_id).values(**values))
    refusers = set(session.execute(select(r.agent_id).where(ti_key)).scalars())
    policy = get_queue_policy(session, job.queue)
    takers = [
        agent.id for agent in list_agents(session) if agent.id not in refusers and could_serve(agent, job.queue, policy)
    ]
    guard = (job_table.c.id == job_id, job_table.c.fencing == fencing, job_table.c.state == JobStatus.LEASED)
    if takers:
        session.execute(
            update(job_table)
            .where(*guard)
            .values(**_BACK_TO_QUEUE)
        )
    else:
        why = f"refused by agent {agent_id}: {reason or 'no reason given'}"
        session.execute(
            update(job_table)
            .where(*guard)
            .values(
                state=JobStatus.FAILED,
                finished_at=now,
                reason=f"{why}; no other agent may run queue {job.queue!r}",
            )
        )
    return Job._from_row(session.execute(select(job_table).where(job_table.c.id == job_id)).one())


def purge_refusals(session: Session, older_than: datetime) -> int:
    """Forget refusals recorded before ``older_than`` (a later retry may be offered to that agent
    again; its local policy refuses it again)."""
    result = session.execute(delete(job_refusal_table).where(job_refusal_table.c.refused_at < older_than))
    return result.rowcount


__all__ = [
    "REFUSED",
    "Agent",
    "AgentNotFound",
    "AgentRevoked",
    "Revocation",
    "Job",
    "JobNotFound",
    "StaleFencing",
    "StoreError",
    "Token",
    "TokenRejected",
    "ClosedJob",
    "OfflineRequeue",
    "cancel_job",
    "cancel_queued_jobs_of_settled_tis",
    "close_running_jobs_of_offline_agents",
    "create_agent",
    "create_token",
    "delete_queue_policy",
    "drain_agent",
    "eligible_queues",
    "enqueue_job",
    "get_agent",
    "get_queue_policy",
    "agent_holds_ti",
    "hash_secret",
    "job_for_agent",
    "jobs_for_keys",
    "lease_next",
    "list_agents",
    "list_queue_policies",
    "mark_reported",
    "pending_events",
    "purge_refusals",
    "purge_reported",
    "queue_policies",
    "queued_exists",
    "record_heartbeat",
    "redeem_token",
    "refuse_job",
    "renew_agent_cert",
    "report_job",
    "requeue_expired_leases",
    "requeue_leased_of_offline_agents",
    "resume_agent",
    "revoke_agent",
    "running_job_counts",
    "set_agent_cert",
    "set_queue_policy",
]
