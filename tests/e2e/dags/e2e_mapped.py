"""E2E: a task mapped over three values runs each instance on the agent; a reducer sums them."""

from __future__ import annotations

from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, task


@dag(dag_id="e2e_mapped", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_mapped():
    @task(executor="EdgeAgentExecutor")
    def square(x: int) -> int:
        report(f"square-{x}")
        print(f"square of {x} is {x * x}")
        return x * x

    @task(executor="EdgeAgentExecutor")
    def total(values: list[int]) -> int:
        report("total")
        result = sum(values)
        print(f"total of squares is {result}")
        return result

    total(square.expand(x=[1, 2, 3]))


e2e_mapped()
