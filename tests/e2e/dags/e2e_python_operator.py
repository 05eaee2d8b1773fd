"""E2E: a classic PythonOperator runs on the agent."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG


def _hello() -> str:
    report("hello")
    print("hello from a PythonOperator on the agent")
    return "hello"


with DAG(
    dag_id="e2e_python_operator",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["e2e"],
):
    PythonOperator(task_id="hello", python_callable=_hello, executor="EdgeAgentExecutor")
