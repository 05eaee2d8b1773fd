"""Create the edge-agent tables: jobs, agents, registration tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Must match :mod:`executor_plugin.models` exactly: on a fresh database ``EdgeAgentDBManager`` builds
the tables from the models and stamps this revision, so a drift between the two would only show
on databases migrated from files (``tests/unit/test_db_manager.py`` compares them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

# revision identifiers, used by Alembic.
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
#: edge-agent release that introduced this revision (keep EdgeAgentDBManager.revision_heads_map in step).
edge_agent_version = "0.1.0"


def upgrade() -> None:
    # UtcDateTime, not sa.DateTime: the models use it, and on MySQL it becomes TIMESTAMP(fsp=6);
    # a plain DateTime here would silently build a different column than create_all does.
    op.create_table(
        "edge_agent_job",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("ti_id", sa.String(length=36), nullable=False),
        sa.Column("dag_id", sa.String(length=250), nullable=False),
        sa.Column("task_id", sa.String(length=250), nullable=False),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=256), nullable=False),
        sa.Column("priority_weight", sa.Integer(), nullable=False),
        sa.Column("workload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=True),
        sa.Column("fencing", sa.Integer(), nullable=False),
        sa.Column("queued_at", UtcDateTime(), nullable=False),
        sa.Column("leased_at", UtcDateTime(), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime(), nullable=True),
        sa.Column("started_at", UtcDateTime(), nullable=True),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reported_state", sa.String(length=20), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "idx_edge_agent_job_lease", "edge_agent_job", ["state", "queue", "priority_weight", "queued_at"]
    )
    op.create_index(
        "idx_edge_agent_job_ti", "edge_agent_job", ["dag_id", "task_id", "run_id", "map_index", "try_number"]
    )
    op.create_index("idx_edge_agent_job_agent", "edge_agent_job", ["agent_id", "state"])

    op.create_table(
        "edge_agent_agent",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("pubkey_fp", sa.String(length=64), nullable=False),
        sa.Column("cert_serial", sa.String(length=64), nullable=True),
        sa.Column("cert_not_after", UtcDateTime(), nullable=True),
        sa.Column("slots_total", sa.Integer(), nullable=False),
        sa.Column("slots_free", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("last_heartbeat", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("idx_edge_agent_agent_token_key", "edge_agent_agent", ["token_id", "pubkey_fp"])

    op.create_table(
        "edge_agent_token",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("edge_agent_token")
    op.drop_index("idx_edge_agent_agent_token_key", table_name="edge_agent_agent")
    op.drop_table("edge_agent_agent")
    for index in ("idx_edge_agent_job_agent", "idx_edge_agent_job_ti", "idx_edge_agent_job_lease"):
        op.drop_index(index, table_name="edge_agent_job")
    op.drop_table("edge_agent_job")
