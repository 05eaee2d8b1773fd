"""E2E: a DAG the hosted side has but the agent serving its queue does not (missing-file path).

The test starts a second agent for queue ``e2e_other_folder`` whose ``--dags-folder`` lacks this
file: the agent must refuse the job with a clear reason and the task must fail, not hang.
"""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, task


@dag(dag_id="e2e_hosted_only", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_hosted_only():
    @task(executor="EdgeAgentExecutor", queue="e2e_other_folder", retries=0)
    def only_on_hosted() -> None:
        report("only_on_hosted")
        print("THIS MUST NOT RUN: the agent has no such DAG file")

    only_on_hosted()


e2e_hosted_only()
