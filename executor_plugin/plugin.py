"""``EdgeAgentsPlugin``: the Airflow plugin of edge-agent (registered through the ``airflow.plugins`` entry point).

It adds the **Edge agents** page to the Airflow UI (Admin menu) and its REST API, a FastAPI sub-app
mounted by the api-server at :data:`URL_PREFIX` (:mod:`executor_plugin.ui`), plus an "Edge agents"
tab on task instances that explains which agents can take the task.

Airflow imports plugins in every component (scheduler, api-server, dag-processor, workers), so this
module does no work at import time: ``fastapi_apps`` and ``external_views`` are computed on first
access, which only the api-server (and ``airflow plugins``) makes. The agent API is served by the
separate gateway process (``airflow edge-agents gateway``), not by the api-server.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

#: Where the api-server mounts the page and its API (not one of Airflow's reserved prefixes).
URL_PREFIX = "/edge-agents"


def _base_path() -> str:
    """The path part of ``[api] base_url`` (Airflow may be served under a sub-path)."""
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class EdgeAgentsPlugin(AirflowPlugin):
    name = "edge_agents"

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from executor_plugin.ui.app import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Edge agents"}]

    @cached_property
    def external_views(self) -> list[dict[str, Any]]:  # type: ignore[override]
        base = _base_path()
        return [
            {
                "name": "Edge agents",
                "href": f"{base}{URL_PREFIX}/",
                "destination": "nav",
                "category": "admin",
                "url_route": "edge-agents",
            },
            {
                # A tab on every task instance: which agents can take it, and why not.
                "name": "Edge agents",
                "href": (
                    f"{base}{URL_PREFIX}/?view=explain&dag_id={{DAG_ID}}&run_id={{RUN_ID}}"
                    "&task_id={TASK_ID}&map_index={MAP_INDEX}"
                ),
                "destination": "task_instance",
                "url_route": "edge-agents-explain",
            },
        ]


__all__ = ["EdgeAgentsPlugin", "URL_PREFIX"]
