"""E2E: an agent task defers to the hosted triggerer and resumes on the agent when the trigger fires.

A small operator on top of the stock ``DateTimeTrigger`` rather than ``TimeDeltaSensor(deferrable=True)``:
that sensor measures its delay from the run's ``run_after``, so on a slow box it may find the moment
already past and succeed without deferring, and the test would prove nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from e2e_probe import report

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import DAG, BaseOperator, timezone


class DeferOnce(BaseOperator):
    def __init__(self, *, wait_seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_seconds = wait_seconds

    def execute(self, context: Any) -> None:
        report("before-defer")
        print("deferring to the triggerer")
        self.defer(
            trigger=DateTimeTrigger(moment=timezone.utcnow() + timedelta(seconds=self.wait_seconds)),
            method_name="resume",
        )

    def resume(self, context: Any, event: Any = None) -> str:
        report("after-resume")
        print(f"resumed after the trigger fired: {event!r}")
        return "resumed"


with DAG(
    dag_id="e2e_deferrable",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["e2e"],
):
    DeferOnce(task_id="wait_then_resume", wait_seconds=3, executor="EdgeAgentExecutor")
