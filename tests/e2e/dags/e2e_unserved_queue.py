"""E2E: a task on a queue no agent serves stays queued, while its sibling on a served queue runs."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, task


@dag(dag_id="e2e_unserved_queue", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_unserved_queue():
    @task(executor="EdgeAgentExecutor")
    def served() -> None:
        report("served")
        print("served queue task ran")

    @task(executor="EdgeAgentExecutor", queue="e2e_nobody_serves_this")
    def stranded() -> None:
        report("stranded")
        print("THIS MUST NOT RUN: no agent serves this queue")

    served()
    stranded()


e2e_unserved_queue()
