"""Fixtures of the PostgreSQL suite: one throwaway cluster per session, one fresh database per test.

The cluster comes from ``scripts/pgcluster.py`` (``initdb`` + ``postgres`` on 127.0.0.1, a free
port, everything under one temp directory); ``scripts/install-test-deps.sh`` installs the server.
Without a server the suite skips, except under CI (env ``CI`` set and not ``0``/``false``), where
a missing PostgreSQL fails it: a green CI run must have exercised PostgreSQL.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Before anything imports Airflow (executor_plugin.models does): never touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-pg-airflow-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from pgcluster import PgCluster, PgClusterError, find_bindir  # noqa: E402

_db_counter = itertools.count(1)


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    if running_in_ci():
        pytest.fail(f"{reason} (CI is set, so the PostgreSQL tests must run: scripts/install-test-deps.sh)",
                    pytrace=False)
    pytest.skip(f"{reason}: run scripts/install-test-deps.sh (and `make install`) to enable tests/pg")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if find_bindir() is None:
        _missing("no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin)")
    if importlib.util.find_spec("psycopg") is None:
        _missing("psycopg 3 is not installed (the `test` extra)")
    # Not tmp_path_factory: pytest's base temp dir is 0700, and as root the server runs as the
    # 'postgres' user, which must reach its directory; mkdtemp under /tmp is reachable.
    base = tempfile.mkdtemp(prefix="edge-agent-pg-")
    cluster = PgCluster(base)
    try:
        cluster.start()
    except PgClusterError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"the PostgreSQL test cluster did not start:\n{exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_new_database(pg_cluster: PgCluster) -> Callable[[str], str]:
    """``pg_new_database(label) -> url``: an empty database, for fixtures wider than one test."""

    def new(label: str) -> str:
        slug = re.sub(r"[^a-z0-9_]+", "_", label.lower()).strip("_")
        return pg_cluster.create_database(f"t{next(_db_counter)}_{slug}"[:63])

    return new


@pytest.fixture
def pg_url(pg_new_database: Callable[[str], str], request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) of an empty database of this test's own."""
    return pg_new_database(request.node.name)
