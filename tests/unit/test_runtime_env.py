"""The runtime's environment defaults for riding out a gateway outage; the operator's own values win."""

from __future__ import annotations

from pathlib import Path

from edge_agent.runtime import RuntimeSettings
from edge_agent.runtime.env import build_env

OUTAGE_DEFAULTS = {
    "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "10",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": "30",
    "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "3",
}


def settings(tmp_path: Path) -> RuntimeSettings:
    return RuntimeSettings(python="/usr/bin/python3", airflow_home=tmp_path / "airflow", dags_folder=None,
                           log_folder=tmp_path / "logs", executor="executor_plugin.executor.EdgeAgentExecutor")


def test_outage_defaults_are_set(tmp_path: Path) -> None:
    env = build_env(settings(tmp_path), {"PATH": "/usr/bin"})
    for key, value in OUTAGE_DEFAULTS.items():
        assert env[key] == value, key


def test_the_operators_own_values_win(tmp_path: Path) -> None:
    mine = {"AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "2", "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": "5",
            "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "9"}
    env = build_env(settings(tmp_path), {"PATH": "/usr/bin", **mine})
    for key, value in mine.items():
        assert env[key] == value, key


def test_agent_settings_do_not_reach_tasks(tmp_path: Path) -> None:
    env = build_env(settings(tmp_path), {"EDGE_AGENT_DRAIN_GRACE": "60", "EDGE_AGENT_TOKEN": "secret"})
    assert not [k for k in env if k.startswith("EDGE_AGENT_")]
