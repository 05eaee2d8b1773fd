"""The chaos suite's DAG ``chaos``: independent short tasks, each recording its start and end in a ledger.

Every try of every task appends one JSON line when its code starts and one when it ends to the file
named by ``$CHAOS_LEDGER`` (the agents get it; the hosted side never runs these tasks), opened with
``O_APPEND`` so lines from concurrent processes on both agents never interleave. The suite counts
duplicate tries from this file, independently of Airflow's and the agents' own records. A task that
finds no ledger fails: without one, "no try ran twice" could not be checked.

The task count comes from ``$CHAOS_TASKS`` (default 200); the hosted side and the agents must see the
same value, or the agent's DAG would lack tasks the scheduler queued.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta

from airflow.sdk import DAG, get_current_context, task

# Keep in step with tests/chaos/chaos_stack.py (not imported: this file belongs to the DAG bundle).
LEDGER_ENV = "CHAOS_LEDGER"
MARKER_ENV = "CHAOS_AGENT"
TASKS_ENV = "CHAOS_TASKS"
DAG_ID = "chaos"
QUEUE = "chaos"


def _count() -> int:
    try:
        return max(1, int(os.environ.get(TASKS_ENV, "200")))
    except ValueError:
        return 200


def seconds_for(index: int) -> float:
    """0.2 to 1.5 s, spread evenly over the tasks (deterministic, so every run has the same shape)."""
    return 0.2 + ((index * 37) % 14) / 10


def _record(event: str) -> None:
    path = os.environ.get(LEDGER_ENV)
    if not path:
        raise RuntimeError(f"${LEDGER_ENV} is not set: this task must run on a chaos-suite agent")
    ti = get_current_context()["ti"]
    line = json.dumps(
        {
            "ev": event,
            "dag": ti.dag_id,
            "task": ti.task_id,
            "run": ti.run_id,
            "map": ti.map_index,
            "try": ti.try_number,
            "pid": os.getpid(),
            "agent": os.environ.get(MARKER_ENV, ""),
            "t": time.time(),
        },
        sort_keys=True,
    )
    # One write() of one line on an O_APPEND descriptor: concurrent writers never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task
def work(seconds: float) -> None:
    _record("start")
    time.sleep(seconds)
    _record("end")


with DAG(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    # Only the agents' slots may limit concurrency, never the DAG's defaults (16).
    max_active_tasks=1000,
    # One run at a time: each test's run must not share the agents with a leftover one.
    max_active_runs=1,
    default_args={
        "executor": "EdgeAgentExecutor",
        "queue": QUEUE,
        "retries": 3,
        "retry_delay": timedelta(seconds=3),
    },
    tags=["chaos"],
):
    for _i in range(_count()):
        work.override(task_id=f"t{_i:03d}")(seconds_for(_i))
