"""E2E: an agent task fails on its first try and succeeds on the retry."""

from __future__ import annotations

from datetime import datetime, timedelta

from e2e_probe import report

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="e2e_retry", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_retry():
    @task(executor="EdgeAgentExecutor", retries=1, retry_delay=timedelta(seconds=2))
    def flaky() -> int:
        try_number = get_current_context()["ti"].try_number
        report(f"flaky-try-{try_number}")
        if try_number == 1:
            raise RuntimeError("failing on purpose on try 1")
        print(f"succeeded on try {try_number}")
        return try_number

    flaky()


e2e_retry()
