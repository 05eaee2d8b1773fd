"""E2E (operator UI): two agent tasks that run until the test releases them, so their logs can be
read while they run and after.

``hosted_logs`` runs on queue ``default`` (its log is shipped to the hosted side); ``local_logs`` on
queue ``e2e_local_logs``, whose policy the test sets to ``logs = local`` (its log stays on the agent).
Each prints a line, then waits until the file named by the run's conf ``release`` exists (at most
``wait_seconds``, default 240): the test creates it once it has read the running tasks' logs.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from e2e_probe import report

from airflow.sdk import dag, get_current_context, task


def _wait_for_release() -> None:
    conf = get_current_context()["dag_run"].conf or {}
    release = conf.get("release")
    deadline = time.monotonic() + float(conf.get("wait_seconds", 240))
    while release and not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not released: {release} never appeared")
        time.sleep(0.5)


@dag(dag_id="e2e_operator_ui", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["e2e"])
def e2e_operator_ui():
    @task(executor="EdgeAgentExecutor")
    def hosted_logs() -> None:
        report("hosted_logs")
        print("operator-ui: hosted log line", flush=True)
        _wait_for_release()
        print("operator-ui: hosted task released", flush=True)

    @task(executor="EdgeAgentExecutor", queue="e2e_local_logs")
    def local_logs() -> None:
        report("local_logs")
        print("operator-ui: local log line (must stay on the agent)", flush=True)
        _wait_for_release()

    hosted_logs()
    local_logs()


e2e_operator_ui()
