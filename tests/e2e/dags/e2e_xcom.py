"""E2E: one agent task returns a value, a second agent task receives it through XCom."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, task


@dag(dag_id="e2e_xcom", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_xcom():
    @task(executor="EdgeAgentExecutor")
    def produce() -> dict:
        report("produce")
        print("producing payload n=21")
        return {"n": 21, "who": "producer"}

    @task(executor="EdgeAgentExecutor")
    def consume(payload: dict) -> int:
        report("consume")
        doubled = payload["n"] * 2
        print(f"consumed payload from {payload['who']}: doubled={doubled}")
        return doubled

    consume(produce())


e2e_xcom()
