"""Every query and transaction of the hosted side.

The executor, the gateway and the admin commands call these functions; none of them writes SQL.
Functions take a SQLAlchemy session and leave the commit to the caller, except where the docstring
says otherwise (leasing commits, because its compare-and-set must be visible at once).

Concurrency: a job moves out of QUEUED only through :func:`lease_next`, an ``UPDATE ... WHERE
state = 'queued' AND fencing = <seen>`` compare-and-set, so two gateways (or two requests in one
gateway) can never lease one job twice; the loser simply tries the next candidate. On PostgreSQL the
candidate scan uses ``FOR UPDATE SKIP LOCKED`` so concurrent leasers do not queue behind each other.
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

from executor_plugin.models import AgentStatus, JobStatus, agent_table, job_table, token_table

#: Candidates examined per lease attempt; more than one so a lost compare-and-set race moves on.
_LEASE_CANDIDATES = 8


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
    slots_total: int
    slots_free: int
    version: str | None
    created_at: datetime
    last_heartbeat: datetime | None

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
        .values(
            state=JobStatus.QUEUED,
            agent_id=None,
            leased_at=None,
            lease_expires_at=None,
            fencing=job_table.c.fencing + 1,
        )
    )
    return result.rowcount


def cancel_queued_jobs_of_settled_tis(session: Session, now: datetime | None = None) -> int:
    """Cancel queued jobs whose task instance is no longer QUEUED for that try.

    An operator can settle a queued TI by hand (mark the run failed, clear it, delete the run); the
    scheduler does not revoke the job then, and an agent would later lease a try Airflow has moved
    past. Jobs and TIs are matched by the TI's id and try number.
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState

    queued = session.execute(
        select(job_table.c.id, job_table.c.ti_id, job_table.c.try_number).where(job_table.c.state == JobStatus.QUEUED)
    ).all()
    if not queued:
        return 0
    live: dict[str, tuple[str | None, int]] = {}
    for start in range(0, len(queued), 500):
        ti_ids = [uuid.UUID(row.ti_id) for row in queued[start : start + 500]]
        rows = session.execute(
            select(TaskInstance.id, TaskInstance.state, TaskInstance.try_number).where(TaskInstance.id.in_(ti_ids))
        )
        live.update({str(ti_id): (state, try_number) for ti_id, state, try_number in rows})
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
        slots_total=0,
        slots_free=0,
        version=None,
        created_at=now or utcnow(),
        last_heartbeat=None,
    )
    session.execute(insert(agent_table).values(**values))
    return Agent._from_row(_FakeRow(values))


def set_agent_cert(session: Session, agent_id: str, *, serial: str, not_after: datetime) -> None:
    session.execute(
        update(agent_table).where(agent_table.c.id == agent_id).values(cert_serial=serial, cert_not_after=not_after)
    )


def get_agent(session: Session, agent_id: str) -> Agent | None:
    row = session.execute(select(agent_table).where(agent_table.c.id == agent_id)).first()
    return Agent._from_row(row) if row is not None else None


def list_agents(session: Session) -> list[Agent]:
    rows = session.execute(select(agent_table).order_by(agent_table.c.created_at))
    return [Agent._from_row(r) for r in rows]


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
# Leasing (gateway)
# ---------------------------------------------------------------------------------------------------


def queued_exists(session: Session, queues: Sequence[str]) -> bool:
    row = session.execute(
        select(job_table.c.id)
        .where(job_table.c.state == JobStatus.QUEUED, job_table.c.queue.in_(list(queues)))
        .limit(1)
    ).first()
    return row is not None


def lease_next(session: Session, agent: Agent, *, lease_ttl: timedelta, now: datetime | None = None) -> Job | None:
    """Lease the most urgent queued job of the agent's granted queues; commits.

    Eligibility comes from the agent row (server-side facts) only. Returns None when nothing is
    eligible or every candidate was taken by a concurrent leaser.
    """
    if agent.state != AgentStatus.ACTIVE or not agent.queues:
        return None
    now = now or utcnow()
    candidates_q = (
        select(job_table.c.id, job_table.c.fencing)
        .where(job_table.c.state == JobStatus.QUEUED, job_table.c.queue.in_(list(agent.queues)))
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
    """Record an agent's report about a job it holds. Repeating the same report is harmless."""
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


__all__ = [
    "Agent",
    "Job",
    "JobNotFound",
    "StaleFencing",
    "StoreError",
    "Token",
    "TokenRejected",
    "cancel_job",
    "cancel_queued_jobs_of_settled_tis",
    "create_agent",
    "create_token",
    "enqueue_job",
    "get_agent",
    "hash_secret",
    "job_for_agent",
    "jobs_for_keys",
    "lease_next",
    "list_agents",
    "mark_reported",
    "pending_events",
    "purge_reported",
    "queued_exists",
    "record_heartbeat",
    "redeem_token",
    "report_job",
    "requeue_expired_leases",
    "running_job_counts",
    "set_agent_cert",
]
