"""``airflow db migrate`` creates our tables, and the migration files build exactly what models.py defines.

Airflow runs in subprocesses against a temp AIRFLOW_HOME with a SQLite file; the schema checks use
alembic's autogenerate comparison (``compare_metadata``), the same diff ``alembic revision
--autogenerate`` would write.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports Airflow: never let the test process touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from alembic import command  # noqa: E402
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.migration import MigrationContext  # noqa: E402
from sqlalchemy import Column, Integer, MetaData, create_engine, inspect, text  # noqa: E402

from executor_plugin.db_manager import VERSION_TABLE, EdgeAgentDBManager  # noqa: E402
from executor_plugin.models import metadata  # noqa: E402

OUR_TABLES = {
    "edge_agent_job",
    "edge_agent_agent",
    "edge_agent_token",
    "edge_agent_queue_policy",
    "edge_agent_job_refusal",
}
HEAD = "0002"


def airflow_env(home: Path) -> dict[str, str]:
    """A clean environment for an ``airflow`` subprocess: nothing inherited from the caller's Airflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
    )
    return env


def run_airflow(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=airflow_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )


def schema_diff(db_file: Path, target: MetaData = metadata) -> list:
    """What alembic autogenerate would change in the DB to match ``target`` (our tables only)."""
    engine = create_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_object": lambda _o, name, type_, *_: not (
                        type_ == "table" and name not in target.tables
                    ),
                },
            )
            return compare_metadata(ctx, target)
    finally:
        engine.dispose()


def db_revision(db_file: Path) -> str | None:
    engine = create_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def migrated_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-home")
    proc = run_airflow(home, "db", "migrate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return home


def test_db_migrate_creates_our_tables_and_version_table(migrated_home):
    engine = create_engine(f"sqlite:///{migrated_home / 'airflow.db'}")
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert OUR_TABLES | {VERSION_TABLE} <= tables
    assert "dag" in tables  # Airflow's own tables, created first
    assert db_revision(migrated_home / "airflow.db") == HEAD


def test_db_migrate_again_is_a_no_op(migrated_home):
    proc = run_airflow(migrated_home, "db", "migrate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert db_revision(migrated_home / "airflow.db") == HEAD
    assert schema_diff(migrated_home / "airflow.db") == []


def test_tables_built_from_models_match_models(migrated_home):
    # On a fresh database the manager builds from the models and stamps head.
    assert schema_diff(migrated_home / "airflow.db") == []


def test_migration_files_build_exactly_the_models(tmp_path):
    # Airflow's own path through our migration files (what upgrades of existing databases run).
    proc = run_airflow(tmp_path, "db", "migrate", "--use-migration-files")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert db_revision(tmp_path / "airflow.db") == HEAD
    assert schema_diff(tmp_path / "airflow.db") == []


def test_schema_diff_does_detect_a_drift(migrated_home):
    # Guards the two tests above against comparing nothing.
    drifted = MetaData()
    for table in metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["edge_agent_job"].append_column(Column("extra", Integer, nullable=True))
    diff = schema_diff(migrated_home / "airflow.db", drifted)
    assert [entry[0] for entry in diff] == ["add_column"]


def test_upgrade_from_0001_keeps_rows_and_matches_the_models(tmp_path):
    # An existing 0.1.0 database: its agents survive the upgrade and get the new column empty.
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    config = Config(EdgeAgentDBManager.alembic_file)
    config.set_main_option("script_location", EdgeAgentDBManager.migration_dir)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
            conn.execute(
                text(
                    "INSERT INTO edge_agent_agent (id, name, queues, region, state, token_id, pubkey_fp, "
                    "slots_total, slots_free, created_at) VALUES ('ag_1', 'n', '[\"q\"]', 'eu-1', 'active', "
                    "'t', 'fp', 0, 0, '2026-01-01 00:00:00')"
                )
            )
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "heads")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, cert_issuer FROM edge_agent_agent")).all() == [("ag_1", None)]
    finally:
        engine.dispose()
    assert db_revision(tmp_path / "x.db") == HEAD
    assert schema_diff(tmp_path / "x.db") == []


def test_downgrade_removes_everything(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    config = Config(EdgeAgentDBManager.alembic_file)
    config.set_main_option("script_location", EdgeAgentDBManager.migration_dir)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "heads")
        assert OUR_TABLES <= set(inspect(engine).get_table_names())
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        assert not OUR_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_manager_settings():
    assert EdgeAgentDBManager.version_table_name == VERSION_TABLE == "alembic_version_edge_agent"
    assert EdgeAgentDBManager.metadata is metadata
    assert Path(EdgeAgentDBManager.migration_dir, "env.py").is_file()
    assert Path(EdgeAgentDBManager.alembic_file).is_file()
    assert HEAD in EdgeAgentDBManager.revision_heads_map.values()
