"""E2E: an agent task reads an Airflow Variable through the Execution API (the test creates it)."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import Variable, dag, task


@dag(dag_id="e2e_variable", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_variable():
    @task(executor="EdgeAgentExecutor")
    def read_variable() -> str:
        report("read_variable")
        value = Variable.get("e2e_greeting")
        print(f"variable e2e_greeting={value}")
        return value

    read_variable()


e2e_variable()
