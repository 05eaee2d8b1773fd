"""Tables of the hosted side, in their own SQLAlchemy metadata (managed by ``EdgeAgentDBManager``).

Nothing here runs a query: every read and write lives in :mod:`executor_plugin.store`.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text

from airflow.utils.sqlalchemy import UtcDateTime

metadata = MetaData()


class JobStatus:
    """Life of a job row. Only the gateway moves a job out of QUEUED; only the executor deletes."""

    QUEUED = "queued"  # written by the executor in the scheduler's transaction
    LEASED = "leased"  # handed to one agent under a fencing id; requeued if the lease lapses
    RUNNING = "running"  # the agent confirmed the supervisor started
    SUCCESS = "success"  # the supervisor exited 0 (the task reported its own state already)
    FAILED = "failed"  # the supervisor exited non-zero, or the agent could not run it
    CANCELLED = "cancelled"  # revoked by the scheduler

    TERMINAL = (SUCCESS, FAILED, CANCELLED)
    ACTIVE = (LEASED, RUNNING)


class AgentStatus:
    ACTIVE = "active"
    DRAINING = "draining"
    REVOKED = "revoked"


job_table = Table(
    "edge_agent_job",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("ti_id", String(36), nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("task_id", String(250), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("map_index", Integer, nullable=False, default=-1),
    Column("try_number", Integer, nullable=False),
    Column("queue", String(256), nullable=False),
    Column("priority_weight", Integer, nullable=False, default=1),
    Column("workload", Text, nullable=False),
    Column("state", String(20), nullable=False),
    Column("agent_id", String(64), nullable=True),
    Column("fencing", Integer, nullable=False, default=0),
    Column("queued_at", UtcDateTime, nullable=False),
    Column("leased_at", UtcDateTime, nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("started_at", UtcDateTime, nullable=True),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("reason", Text, nullable=True),
    # The executor has turned the latest state into a scheduler event.
    Column("reported_state", String(20), nullable=True),
    Index("idx_edge_agent_job_lease", "state", "queue", "priority_weight", "queued_at"),
    Index("idx_edge_agent_job_ti", "dag_id", "task_id", "run_id", "map_index", "try_number"),
    Index("idx_edge_agent_job_agent", "agent_id", "state"),
)

agent_table = Table(
    "edge_agent_agent",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("queues", Text, nullable=False),  # JSON list, copied from the registration token
    Column("region", String(64), nullable=False),
    Column("state", String(20), nullable=False),
    Column("token_id", String(32), nullable=False),
    Column("pubkey_fp", String(64), nullable=False),
    Column("cert_serial", String(64), nullable=True),
    Column("cert_not_after", UtcDateTime, nullable=True),
    # SPKI pin (hex) of the CA that issued the latest certificate: shows who still needs a new one
    # while the CA rotates.
    Column("cert_issuer", String(64), nullable=True),
    Column("slots_total", Integer, nullable=False, default=0),
    Column("slots_free", Integer, nullable=False, default=0),
    Column("version", String(64), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_heartbeat", UtcDateTime, nullable=True),
    Index("idx_edge_agent_agent_token_key", "token_id", "pubkey_fp"),
)

token_table = Table(
    "edge_agent_token",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),  # SHA-256 hex of the 128-bit secret
    Column("queues", Text, nullable=False),  # JSON list
    Column("region", String(64), nullable=False),
    Column("name", String(200), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("max_uses", Integer, nullable=False, default=1),
    Column("uses", Integer, nullable=False, default=0),
)

queue_policy_table = Table(
    "edge_agent_queue_policy",
    metadata,
    Column("queue", String(256), primary_key=True),
    # JSON list of fnmatch patterns of the regions the queue may run in; NULL: any region.
    Column("regions", Text, nullable=True),
    Column("logs", String(10), nullable=False),  # hosted | local
    Column("updated_at", UtcDateTime, nullable=False),
)

# One row per (task instance, agent) that the agent's local policy refused. Keyed on the task
# instance, not the job or the try: Airflow gives every try a new TI id and the executor a new job
# row, and the agent's policy would refuse a retry of the same task just the same.
job_refusal_table = Table(
    "edge_agent_job_refusal",
    metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("dag_id", String(250), primary_key=True),
    Column("task_id", String(250), primary_key=True),
    Column("run_id", String(250), primary_key=True),
    Column("map_index", Integer, primary_key=True, autoincrement=False),
    # The refused job and lease (a repeated report of the same refusal is recognised by them).
    Column("job_id", String(36), nullable=False),
    Column("fencing", Integer, nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("refused_at", UtcDateTime, nullable=False),
)

__all__ = [
    "AgentStatus",
    "JobStatus",
    "agent_table",
    "job_refusal_table",
    "job_table",
    "metadata",
    "queue_policy_table",
    "token_table",
]
