"""``EdgeAgentDBManager``: lets ``airflow db migrate`` create and upgrade the edge-agent tables.

The tables live in their own ``MetaData`` (:mod:`executor_plugin.models`) with their own alembic
chain in ``migrations/`` and version table ``alembic_version_edge_agent``, so our schema moves
independently of Airflow's. The provider info registers this class under ``db-managers``.
"""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager

from executor_plugin.models import metadata

PACKAGE_DIR = Path(__file__).parent

VERSION_TABLE = "alembic_version_edge_agent"

#: edge-agent release -> alembic head of that release (used by ``airflow db downgrade`` tooling).
REVISION_HEADS_MAP: dict[str, str] = {
    "0.1.0": "0002",
}


class EdgeAgentDBManager(BaseDBManager):
    """Creates (fresh DB: from the models, then stamps head) or migrates the edge-agent tables."""

    metadata = metadata
    version_table_name = VERSION_TABLE
    migration_dir = (PACKAGE_DIR / "migrations").as_posix()
    alembic_file = (PACKAGE_DIR / "alembic.ini").as_posix()
    # `airflow db reset` drops our tables with Airflow's; otherwise they would survive a reset
    # and hold jobs for task instances that no longer exist.
    supports_table_dropping = True
    revision_heads_map = REVISION_HEADS_MAP


def manager_path() -> str:
    """The import path Airflow knows this manager by (provider info, ``[database] external_db_managers``)."""
    return f"{EdgeAgentDBManager.__module__}.{EdgeAgentDBManager.__qualname__}"


__all__ = ["VERSION_TABLE", "EdgeAgentDBManager", "manager_path"]
