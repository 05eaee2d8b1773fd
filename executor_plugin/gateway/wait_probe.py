"""The lease notifier's reads: what is queued, and the agents that hold polls, in a fixed number of
queries per cycle whatever the number of waiting polls.

* :func:`queued_work`: one statement. Queued jobs counted by queue, plus, for every agent that
  refused task instances still queued, how many of them per queue. From the two counts the notifier
  knows, for any waiter, whether a job it may take is queued on its queues (``lease_next`` skips an
  agent's refusals, so must the wake-up, or a refused job would wake that agent at every cycle).
* :func:`holder_views`: the rows of the agents holding polls (one statement, their ids passed as one
  parameter) and the queue policies (one statement). What each may lease is decided by
  :func:`executor_plugin.policy.servable_queues`, as ``store.eligible_queues`` does for a lease
  attempt.

The SQL lives here, not in :mod:`executor_plugin.store`: these are snapshots only the gateway's
wake-up reads; whatever they say, ``store.lease_next`` decides what is leased.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    any_,
    bindparam,
    cast,
    column,
    func,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from executor_plugin import store
from executor_plugin.models import JobStatus, agent_table, job_refusal_table, job_table
from executor_plugin.policy import servable_queues

#: Ids per ``IN (...)`` list on databases other than PostgreSQL and SQLite.
_IDS_PER_STATEMENT = 5000


@dataclass(frozen=True)
class QueuedWork:
    #: Queue name -> jobs queued on it (queues without queued jobs are absent).
    queued: Mapping[str, int]
    #: (agent id, queue) -> jobs queued on that queue whose task instance that agent refused.
    refused: Mapping[tuple[str, str], int]

    def takeable(self, agent_id: str, queue: str) -> int:
        """How many jobs queued on ``queue`` the agent has not refused."""
        return self.queued.get(queue, 0) - self.refused.get((agent_id, queue), 0)


@dataclass(frozen=True)
class HolderView:
    """An agent holding a poll, as stored now."""

    state: str
    #: The queues it may lease from now: granted, and admitted by their policies from its region.
    eligible: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """One cycle's reads. ``None``: not read in this cycle."""

    work: QueuedWork | None = None
    #: Agent id -> view; an id asked for but absent has no agent row any more.
    holders: Mapping[str, HolderView] | None = None


def queued_work(session: Session) -> QueuedWork:
    j, r = job_table.c, job_refusal_table.c
    per_queue = (
        select(j.queue, cast(null(), String(64)).label("agent_id"), func.count().label("jobs"))
        .where(j.state == JobStatus.QUEUED)
        .group_by(j.queue)
    )
    refused = (
        select(j.queue, r.agent_id, func.count())
        .select_from(
            job_refusal_table.join(
                job_table,
                and_(
                    r.dag_id == j.dag_id, r.task_id == j.task_id, r.run_id == j.run_id, r.map_index == j.map_index
                ),
            )
        )
        .where(j.state == JobStatus.QUEUED)
        .group_by(j.queue, r.agent_id)
    )
    queued: dict[str, int] = {}
    refusals: dict[tuple[str, str], int] = {}
    for queue, agent_id, jobs in session.execute(union_all(per_queue, refused)):
        if agent_id is None:
            queued[queue] = jobs
        else:
            refusals[(agent_id, queue)] = jobs
    return QueuedWork(queued, refusals)


@dataclass(frozen=True)
class _Facts:
    """What ``policy.servable_queues`` reads of an agent (``policy.AgentFacts``)."""

    id: str
    queues: tuple[str, ...]
    region: str
    state: str


def _id_lists(session: Session, ids: list[str]) -> Iterator[ColumnElement[bool]]:
    """``agent.id`` among ``ids``, as few statements' conditions as the database allows.

    A 1,000-item ``IN (...)`` costs more to render and parse, in SQLAlchemy and psycopg, than the
    query takes to run (measured: most of a 1,000-agent read): PostgreSQL gets one array parameter,
    SQLite one JSON parameter, other databases plain ``IN`` lists in chunks.
    """
    a = agent_table.c
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        yield a.id == any_(bindparam("ids", ids, type_=ARRAY(String)))
    elif dialect == "sqlite":
        yield a.id.in_(select(column("value")).select_from(func.json_each(bindparam("ids", json.dumps(ids)))))
    else:
        for start in range(0, len(ids), _IDS_PER_STATEMENT):
            yield a.id.in_(ids[start : start + _IDS_PER_STATEMENT])


def holder_views(session: Session, agent_ids: Sequence[str]) -> dict[str, HolderView]:
    ids = list(dict.fromkeys(agent_ids))
    if not ids:
        return {}
    a = agent_table.c
    facts: list[_Facts] = []
    for condition in _id_lists(session, ids):
        rows = session.execute(select(a.id, a.queues, a.region, a.state).where(condition)).all()
        facts += [_Facts(row.id, tuple(json.loads(row.queues)), row.region, row.state) for row in rows]
    # Every policy rather than those of the holders' queues: policies are few, their queues many.
    policies = store.queue_policies(session)
    return {agent.id: HolderView(agent.state, frozenset(servable_queues(agent, policies))) for agent in facts}


def snapshot(session: Session, agent_ids: Sequence[str] | None, work: bool) -> Snapshot:
    """The agents ``agent_ids`` (None: not read) and, when ``work``, the queued jobs."""
    return Snapshot(
        work=queued_work(session) if work else None,
        holders=holder_views(session, agent_ids) if agent_ids is not None else None,
    )


def read_snapshot(agent_ids: Sequence[str] | None, work: bool) -> Snapshot:
    """:func:`snapshot` in one Airflow session (runs in a worker thread)."""
    from airflow.utils.session import create_session

    with create_session() as session:
        return snapshot(session, agent_ids, work)


__all__ = ["HolderView", "QueuedWork", "Snapshot", "holder_views", "queued_work", "read_snapshot", "snapshot"]
