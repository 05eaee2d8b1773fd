"""Alembic environment of the edge-agent tables (run by ``EdgeAgentDBManager`` through ``airflow db migrate``).

Uses Airflow's configured engine (or a connection handed in through ``config.attributes``) and
keeps its own version table, so our revisions never mix with Airflow's.
"""

from __future__ import annotations

import contextlib
from logging import getLogger
from logging.config import fileConfig

from alembic import context

from airflow import settings

from executor_plugin.db_manager import EdgeAgentDBManager

config = context.config
version_table = EdgeAgentDBManager.version_table_name
target_metadata = EdgeAgentDBManager.metadata

# Only configure logging when nobody has: Airflow's own logging must not be replaced mid-command.
if not getLogger().handlers and config.config_file_name:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def include_object(_obj, name, type_, *_args) -> bool:
    # Autogenerate sees the whole Airflow database; without this filter it would propose to drop
    # every Airflow table.
    return not (type_ == "table" and name not in target_metadata.tables)


def run_migrations_offline() -> None:
    context.configure(
        url=settings.SQL_ALCHEMY_CONN,
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        render_as_batch=True,
        version_table=version_table,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with contextlib.ExitStack() as stack:
        connection = config.attributes.get("connection", None)
        if connection is None:
            connection = stack.enter_context(settings.engine.connect())
        context.configure(
            connection=connection,
            transaction_per_migration=True,
            target_metadata=target_metadata,
            compare_type=True,
            include_object=include_object,
            render_as_batch=True,
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
