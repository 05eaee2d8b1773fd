"""Provider info of the ``edge-agent`` distribution (entry point ``apache_airflow_provider``).

Airflow calls :func:`get_provider_info` in every ``airflow`` command, so it only builds a dict.
It registers the executor (listing only: ``[core] executor`` enables it), the DB manager run by
``airflow db migrate``, the ``airflow edge-agents`` commands and the ``[edge_agent]`` config section
(names and defaults must match :mod:`executor_plugin.settings`).
"""

from __future__ import annotations

from typing import Any

from edge_agent import __version__

#: Must equal the distribution name: Airflow refuses a provider whose package-name differs.
PACKAGE_NAME = "edge-agent"


def _option(description: str, type_: str, default: str, example: str | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "version_added": "0.1.0",
        "type": type_,
        "example": example,
        "default": default,
    }


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE_NAME,
        "name": "Edge Agent",
        "description": (
            "Runs Airflow tasks on agents inside customers' own networks. Agents connect outbound only, "
            "over mutual TLS with certificates from the deployment's own CA, and lease work that the "
            "EdgeAgentExecutor stores in the metadata database."
        ),
        "versions": [__version__],
        "executors": ["executor_plugin.EdgeAgentExecutor"],
        "db-managers": ["executor_plugin.db_manager.EdgeAgentDBManager"],
        "cli": ["executor_plugin.cli.get_cli_commands"],
        "config": {
            "edge_agent": {
                "description": "Hosted side of edge-agent: the agent gateway, its CA and job leasing.",
                "options": {
                    "ca_dir": _option(
                        "Directory holding the edge-agent CA (certificate and private key, created by "
                        "``airflow edge-agents ca init``). Every gateway replica needs the same CA. "
                        "Empty means ``{AIRFLOW_HOME}/edge_agent/ca``.",
                        "string",
                        "",
                        "/var/lib/airflow/edge_agent/ca",
                    ),
                    "trust_domain": _option(
                        "Trust domain written into agent certificates as "
                        "``spiffe://<trust_domain>/agent/<agent-id>``.",
                        "string",
                        "edge-agent.local",
                        "agents.example.com",
                    ),
                    "cert_ttl_seconds": _option(
                        "Lifetime of an agent's client certificate in seconds; agents renew it before "
                        "it expires.",
                        "integer",
                        "86400",
                    ),
                    "agent_dead_after_seconds": _option(
                        "Seconds without a heartbeat after which an agent is offline: the jobs it "
                        "leased but did not start go back to the queue at once. Must be > 0.",
                        "float",
                        "30",
                    ),
                    "lease_ttl_seconds": _option(
                        "Seconds an agent has to confirm that a leased job started; a lease not "
                        "confirmed in time goes back to the queue. Running jobs keep their lease "
                        "through the agent's heartbeat.",
                        "integer",
                        "60",
                    ),
                    "lease_poll_interval": _option(
                        "Seconds between re-checks of the job table while a lease request waits for "
                        "work (the wake-up across processes on databases without notifications).",
                        "float",
                        "0.1",
                    ),
                },
            }
        },
    }


__all__ = ["PACKAGE_NAME", "get_provider_info"]
