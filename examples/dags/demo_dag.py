"""Demo DAG: agent -> hosted -> agent, with XComs crossing the boundary both ways.

``extract`` and ``load`` run on an edge agent (``executor="EdgeAgentExecutor"``, queue ``default``):
in a real deployment that is the customer's machine, next to the data. ``summarise`` runs on the
hosted side with the LocalExecutor and only sees what ``extract`` chose to return.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime

from airflow.sdk import dag, task


@dag(
    dag_id="edge_agent_demo",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["edge-agent", "demo"],
)
def edge_agent_demo():
    @task(executor="EdgeAgentExecutor", queue="default")
    def extract() -> dict:
        rows = [{"region": "eu", "amount": 120}, {"region": "eu", "amount": 80}, {"region": "us", "amount": 50}]
        print(f"extract: read {len(rows)} rows on {socket.gethostname()} (pid {os.getpid()})")
        # Only an aggregate leaves the agent; the rows themselves stay where they were read.
        totals: dict[str, int] = {}
        for row in rows:
            totals[row["region"]] = totals.get(row["region"], 0) + row["amount"]
        return totals

    @task(executor="LocalExecutor")
    def summarise(totals: dict) -> str:
        line = ", ".join(f"{region}={amount}" for region, amount in sorted(totals.items()))
        print(f"summarise (hosted): {line}")
        return line

    @task(executor="EdgeAgentExecutor", queue="default")
    def load(summary: str) -> None:
        print(f"load: writing summary '{summary}' back on the agent side")

    load(summarise(extract()))


edge_agent_demo()
