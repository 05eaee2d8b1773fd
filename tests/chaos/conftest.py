"""Fixtures of the chaos suite: one chaos deployment per session on a throwaway PostgreSQL, a driver per test.

The deployment (``chaos_stack.ChaosStack``: two schedulers, two gateways, two agents each behind its
own loopback TCP proxy) takes a couple of minutes to start on a 2-core box, so all chaos tests share
it; each test runs its own DAG run and leaves the deployment for the next one. The ``chaos``
fixture makes every test start from a healthy state whatever the previous one left: an unfinished
run is marked failed, proxies are healed, dead components and agents are started again.

PostgreSQL comes from ``scripts/pgcluster.py`` (``scripts/install-test-deps.sh`` installs the
server). Without it the suite skips, except under CI, where it fails, as ``tests/pg`` does.
``CHAOS_TASKS`` (default 200) shrinks the DAG for a quick run of the harness itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (HERE, ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from chaos_harness import Chaos
from chaos_stack import ChaosStack
from localstack import StackError
from pgcluster import PgCluster, PgClusterError, find_bindir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: fault injection against a two-scheduler, two-gateway, two-agent stack on PostgreSQL"
    )
    config.addinivalue_line("markers", "chaos_fault(name, title, fault): the figures file and text of a chaos test")


def _running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    if _running_in_ci():
        pytest.fail(f"{reason} (CI is set, so the chaos suite must run: scripts/install-test-deps.sh)", pytrace=False)
    pytest.skip(f"{reason}: run scripts/install-test-deps.sh (and `make install`) to enable tests/chaos")


@pytest.fixture(scope="session")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    if find_bindir() is None:
        _missing("no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin)")
    if importlib.util.find_spec("psycopg") is None:
        _missing("psycopg 3 is not installed (the `test` extra)")
    if not (ROOT / "scripts" / "tcpproxy.py").exists():
        pytest.fail("scripts/tcpproxy.py is missing: the chaos suite puts every agent behind a TcpProxy",
                    pytrace=False)
    # Not tmp_path_factory for the cluster: pytest's base temp dir is 0700, and as root the server
    # runs as the 'postgres' user, which must reach its directory.
    pg_base = tempfile.mkdtemp(prefix="edge-agent-chaos-pg-")
    pg = PgCluster(pg_base, extra_settings={"max_connections": "300"})
    home = tmp_path_factory.mktemp("chaos")
    stack: ChaosStack | None = None
    try:
        try:
            pg.start()
            db_url = pg.create_database("airflow")
        except PgClusterError as exc:
            pytest.fail(f"the PostgreSQL cluster did not start:\n{exc}", pytrace=False)
        stack = ChaosStack(
            home / "stack", db_url=db_url, db_async_url=pg.async_url("airflow"), ledger=home / "ledger.jsonl",
            tasks=int(os.environ.get("CHAOS_TASKS", "200")),
        )
        try:
            stack.start()
            stack.start_agents()
        except StackError as exc:
            pytest.fail(f"the chaos stack did not start (logs under {stack.logs_dir}):\n{exc}", pytrace=False)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        pg.stop()
        shutil.rmtree(pg_base, ignore_errors=True)


def _heal(stack: ChaosStack) -> list[str]:
    """Bring the deployment back to health; what had to be repaired (a previous test broke off)."""
    repaired = []
    for proxy in (stack.proxy_a, stack.proxy_b):
        proxy.heal()  # idempotent: a healthy proxy stays as it is
    for comp in list(stack.components):
        if not comp.alive:
            stack.restart(comp.name)
            repaired.append(f"restarted {comp.name}")
    for agent in list(stack.agents):
        if not agent.alive:
            stack.restart_agent(agent.name)
            repaired.append(f"restarted agent {agent.name}")
    abandoned = stack.abandon_unfinished_runs()
    if abandoned:
        repaired.append(f"marked unfinished runs failed: {abandoned}")
    return repaired


@pytest.fixture()
def chaos(chaos_stack: ChaosStack, request: pytest.FixtureRequest) -> Iterator[Chaos]:
    """A driver for this test, on a healthy deployment (see the module docstring)."""
    marker = request.node.get_closest_marker("chaos_fault")
    if marker is None:
        pytest.fail("a chaos test names its fault: @pytest.mark.chaos_fault(name, title, fault)", pytrace=False)
    name, title, fault = marker.args
    try:
        repaired = _heal(chaos_stack)
    except StackError as exc:
        pytest.fail(f"the chaos stack could not be brought back to health before {name}:\n{exc}\n"
                    f"{chaos_stack.log_tails(60)}", pytrace=False)
    driver = Chaos(chaos_stack, name, title, fault)
    driver.notes += [f"before the test: {r}" for r in repaired]
    try:
        yield driver
    finally:
        driver.close()
