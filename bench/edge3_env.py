"""How the benchmark runs Apache Airflow's own EdgeExecutor (``apache-airflow-providers-edge3``).

Follows the recipe in ``shared/notes/edge3-peer.md`` §4, with edge3's **default** worker settings
(``job_poll_interval`` 5 s, ``heartbeat_interval`` 30 s): the issue's target is against
"EdgeExecutor with its default settings". The provider is installed only in the benchmark's own
venv (``build/bench-venv``, made by ``make bench``), never in the project's ``.venv``.

* Hosted side: the executor is added to ``[core] executor`` and the ``/edge_worker`` API is enabled
  in the api-server (the plugin only mounts it in a process started as ``airflow api-server``).
  ``airflow db migrate`` creates its tables (edge3's DB manager is registered by its provider info).
* Worker: ``airflow edge worker`` with the hosted environment (it must hold the same
  ``[api_auth] jwt_secret``: edge3 workers sign their own requests with it) and ``[edge] api_url``.
"""

from __future__ import annotations

import importlib.util

EXECUTOR_PATH = "airflow.providers.edge3.executors.EdgeExecutor"
#: Workers fetch jobs from queues; the benchmark DAGs put edge3 tasks on this one.
QUEUE = "default"
WORKER_NAME = "bench-edge3"


def available() -> bool:
    """Is the provider importable in this interpreter (the bench venv)?"""
    return importlib.util.find_spec("airflow.providers.edge3") is not None


def hosted_env(api_url: str) -> dict[str, str]:
    """Variables the api-server, scheduler and worker need on top of the stack's own."""
    return {
        "AIRFLOW__EDGE__API_ENABLED": "True",
        "AIRFLOW__EDGE__API_URL": f"{api_url}/edge_worker/v1/rpcapi",
    }


def worker_argv(airflow_bin: str, concurrency: int) -> list[str]:
    return [airflow_bin, "edge", "worker", "-q", QUEUE, "-c", str(concurrency), "-H", WORKER_NAME]


__all__ = ["EXECUTOR_PATH", "QUEUE", "WORKER_NAME", "available", "hosted_env", "worker_argv"]
