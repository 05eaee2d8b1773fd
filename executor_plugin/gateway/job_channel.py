"""The PostgreSQL channel on which an enqueue announces its queue to the gateways.

``store.enqueue_job`` calls :func:`announce_queued` inside the scheduler's enqueue transaction:
PostgreSQL delivers a ``NOTIFY`` only when that transaction commits (never for one rolled back),
and folds identical notifications of one transaction into one, so a batch of jobs on one queue
costs one message. Each gateway LISTENs on :data:`CHANNEL` (:mod:`executor_plugin.gateway.pg_listen`)
and checks for work at once instead of at its next poll. Other databases get nothing here: the
gateway's polling finds their jobs.

Only this module and the listener know the channel's name.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

#: LISTEN/NOTIFY channel; the payload is the queue name.
CHANNEL = "edge_agent_jobs"

# pg_notify() takes the channel as a value (NOTIFY would need it spliced into the statement text).
_NOTIFY = text("SELECT pg_notify(:channel, :queue)")


def announce_queued(session: Session, queue: str) -> None:
    """Tell listening gateways, when the caller's transaction commits, that ``queue`` has a new job."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(_NOTIFY, {"channel": CHANNEL, "queue": queue})


__all__ = ["CHANNEL", "announce_queued"]
