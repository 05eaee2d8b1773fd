"""E2E: LocalExecutor and agent tasks in one DAG, passing XComs hosted -> agent -> hosted."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, task


@dag(dag_id="e2e_mixed", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_mixed():
    @task(executor="LocalExecutor")
    def local_start() -> int:
        report("local_start")
        print("local start produces 5")
        return 5

    @task(executor="EdgeAgentExecutor")
    def remote_middle(value: int) -> int:
        report("remote_middle")
        print(f"remote middle got {value}, returns {value * 10}")
        return value * 10

    @task(executor="LocalExecutor")
    def local_end(value: int) -> None:
        report("local_end")
        print(f"local end received {value}")

    local_end(remote_middle(local_start()))


e2e_mixed()
