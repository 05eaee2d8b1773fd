"""``airflow edge-agents list``: whether each agent is online, its heartbeat age and its status.

The real command as a subprocess against a temp AIRFLOW_HOME (SQLite), agents written through the
real store with back-dated heartbeats.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from test_admin_cli import airflow_env, edge_agents, ok  # noqa: E402
from test_admin_cli_lifecycle import DB, add_agent, one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-home")
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home), cwd=home, capture_output=True, text=True, timeout=600,
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    ok(edge_agents(home, "ca", "init"))
    return home


def beat(home: Path, agent_id: str, seconds_ago: float) -> None:
    from executor_plugin import store

    with DB(home) as s:
        store.record_heartbeat(
            s, agent_id, free_slots=1, total_slots=2, version="0.1.0", cert_not_after=None, running=[],
            lease_ttl=timedelta(minutes=1), now=store.utcnow() - timedelta(seconds=seconds_ago),
        )


def list_with(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", "edge-agents", "list", *args],
        env={**airflow_env(home), **env}, cwd=home, capture_output=True, text=True, timeout=300,
    )


def test_list_shows_status_online_and_heartbeat_age(home):
    from executor_plugin import store

    for agent_id, seconds_ago in (("st-online", 3), ("st-offline", 45), ("st-drain", 3), ("st-drain-off", 600),
                                  ("st-revoked", 3), ("st-never", None)):
        add_agent(home, agent_id)
        if seconds_ago is not None:
            beat(home, agent_id, seconds_ago)
    with DB(home) as s:
        store.drain_agent(s, "st-drain")
        store.drain_agent(s, "st-drain-off")
        store.revoke_agent(s, "st-revoked")

    rows = {r["id"]: r for r in json.loads(ok(edge_agents(home, "list", "--json")).stdout)}

    got = {agent_id: (r["status"], r["online"]) for agent_id, r in rows.items()}
    assert got == {
        "st-online": ("online", True),
        "st-offline": ("offline", False),
        "st-drain": ("draining", True),
        "st-drain-off": ("draining (offline)", False),
        "st-revoked": ("revoked", True),  # online says only that it beat recently
        "st-never": ("never seen", False),
    }
    assert rows["st-never"]["heartbeat_age_seconds"] is None
    assert 3 <= rows["st-online"]["heartbeat_age_seconds"] < 30  # generous: the command takes seconds to start
    assert 45 <= rows["st-offline"]["heartbeat_age_seconds"] < 300
    assert rows["st-drain"]["state"] == "draining"  # the stored state is still there

    table = ok(edge_agents(home, "list")).stdout
    assert "status" in table
    for word in ("draining (offline)", "never seen", "revoked", "offline"):
        assert word in table
    assert re.search(r"\b1[0-9] min ago", table), table  # st-drain-off's heartbeat (600 s), as an age


def test_the_window_comes_from_agent_dead_after_seconds(home):
    add_agent(home, "st-window")
    beat(home, "st-window", 45)
    rows = json.loads(ok(list_with(home, "--json", AIRFLOW__EDGE_AGENT__AGENT_DEAD_AFTER_SECONDS="120")).stdout)
    [agent] = [r for r in rows if r["id"] == "st-window"]
    assert (agent["status"], agent["online"]) == ("online", True)


def test_a_bad_window_is_one_clear_error(home):
    proc = list_with(home, "--json", AIRFLOW__EDGE_AGENT__AGENT_DEAD_AFTER_SECONDS="0")
    one_line_error(proc, "[edge_agent] agent_dead_after_seconds must be a number of seconds greater than 0",
                   status=1)


def test_agent_status_covers_every_documented_value():
    from executor_plugin.cli import AGENT_STATUSES, agent_status

    seen = {
        agent_status(state, online=online, ever_seen=ever_seen)
        for state in ("active", "draining", "revoked")
        for online in (True, False)
        for ever_seen in (True, False)
        if ever_seen or not online
    }
    assert seen == set(AGENT_STATUSES)
