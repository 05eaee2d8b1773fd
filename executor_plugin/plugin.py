"""``EdgeAgentsPlugin``: the Airflow plugin of edge-agent (registered through the ``airflow.plugins`` entry point).

Airflow imports plugins in every component (scheduler, api-server, dag-processor, workers), so this
module does no work at import time: no app building, no DB access, no config reads. Admin UI pages
attach here later. The agent API is served by the separate gateway process
(``airflow edge-agents gateway``), not by the api-server, so nothing is mounted here.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class EdgeAgentsPlugin(AirflowPlugin):
    name = "edge_agents"


__all__ = ["EdgeAgentsPlugin"]
