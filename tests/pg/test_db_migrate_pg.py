"""``airflow db migrate`` against a real PostgreSQL (psycopg 3) creates our tables, and is repeatable.

Airflow runs in subprocesses with a temp AIRFLOW_HOME and ``sql_alchemy_conn`` =
``postgresql+psycopg://...``. ``sql_alchemy_conn_async`` is set to ``postgresql+psycopg_async://``
too: left unset, Airflow 3.3 derives ``postgresql+asyncpg://`` and refuses to start without asyncpg.
The schema checks are alembic's autogenerate comparison, as in tests/unit/test_db_manager.py, here
with PostgreSQL's own types (timestamptz, varchar lengths).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url, text

from executor_plugin.db_manager import VERSION_TABLE, EdgeAgentDBManager
from executor_plugin.models import metadata

OUR_TABLES = set(metadata.tables)


def head_revision() -> str:
    config = Config(EdgeAgentDBManager.alembic_file)
    config.set_main_option("script_location", EdgeAgentDBManager.migration_dir)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def run_airflow(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=make_url(url)
        .set(drivername="postgresql+psycopg_async")
        .render_as_string(hide_password=False),
    )
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, cwd=home, capture_output=True, text=True, timeout=600
    )


def inspect_db(url: str) -> tuple[set[str], str | None, list]:
    """(table names, our alembic revision, autogenerate diff of our tables against models.py)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            revision = (
                conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
                if VERSION_TABLE in tables
                else None
            )
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_object": lambda _o, name, type_, *_: not (type_ == "table" and name not in OUR_TABLES),
                },
            )
            diff = compare_metadata(ctx, metadata)
        return tables, revision, diff
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def migrated(pg_new_database, tmp_path_factory) -> tuple[Path, str]:
    url = pg_new_database("db_migrate")
    home = tmp_path_factory.mktemp("airflow-home-pg")
    proc = run_airflow(home, url, "db", "migrate")
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return home, url


def test_url_uses_psycopg3(migrated):
    _, url = migrated
    assert make_url(url).drivername == "postgresql+psycopg"


def test_db_migrate_creates_our_tables_and_version_table(migrated):
    _, url = migrated
    tables, revision, diff = inspect_db(url)
    assert OUR_TABLES | {VERSION_TABLE} <= tables
    assert "dag" in tables and "task_instance" in tables  # Airflow's own schema, created first
    assert revision == head_revision()
    assert diff == []


def test_db_migrate_twice_is_a_no_op(migrated):
    home, url = migrated
    proc = run_airflow(home, url, "db", "migrate")
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    tables, revision, diff = inspect_db(url)
    assert OUR_TABLES | {VERSION_TABLE} <= tables
    assert revision == head_revision()
    assert diff == []


def test_migration_files_build_exactly_the_models_on_postgres(pg_url):
    # The path existing databases take on upgrade: our alembic files, not create_all. Run directly:
    # Airflow's own chain (`db migrate --use-migration-files`) breaks on psycopg 3 in its 2.9.2
    # migration (UPDATE dag SET max_consecutive_failed_dag_runs=$1::VARCHAR), before reaching ours.
    config = Config(EdgeAgentDBManager.alembic_file)
    config.set_main_option("script_location", EdgeAgentDBManager.migration_dir)
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "heads")
        tables, revision, diff = inspect_db(pg_url)
        assert OUR_TABLES | {VERSION_TABLE} <= tables
        assert revision == head_revision()
        assert diff == []
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        assert not OUR_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
