"""Queue policies, refusals by agents, and the issuer of each agent's certificate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Must match :mod:`executor_plugin.models` exactly (``tests/unit/test_db_manager.py`` and
``tests/pg/test_db_migrate_pg.py`` compare them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from airflow.utils.sqlalchemy import UtcDateTime

# revision identifiers, used by Alembic.
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
#: edge-agent release that introduced this revision (keep EdgeAgentDBManager.revision_heads_map in step).
edge_agent_version = "0.1.0"


def upgrade() -> None:
    op.create_table(
        "edge_agent_queue_policy",
        sa.Column("queue", sa.String(length=256), nullable=False),
        sa.Column("regions", sa.Text(), nullable=True),
        sa.Column("logs", sa.String(length=10), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("queue"),
    )
    op.create_table(
        "edge_agent_job_refusal",
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("dag_id", sa.String(length=250), nullable=False),
        sa.Column("task_id", sa.String(length=250), nullable=False),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("map_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("fencing", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("refused_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "dag_id", "task_id", "run_id", "map_index"),
    )
    # Batch mode: SQLite cannot add a column to a table with constraints in place otherwise
    # (a plain ADD COLUMN of a nullable column works, but batch keeps every dialect on one path).
    with op.batch_alter_table("edge_agent_agent") as batch:
        batch.add_column(sa.Column("cert_issuer", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edge_agent_agent") as batch:
        batch.drop_column("cert_issuer")
    op.drop_table("edge_agent_job_refusal")
    op.drop_table("edge_agent_queue_policy")
