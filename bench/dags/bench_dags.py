"""The benchmark's DAGs: the same three shapes once per executor the deployment has configured.

* ``bench_dispatch__<ex>``: ``BENCH_DISPATCH_TASKS`` independent trivial tasks (dispatch latency
  at low load: every task finds a free slot).
* ``bench_trivial__<ex>``: ``BENCH_TRIVIAL_TASKS`` independent trivial tasks (makespan, tasks per
  minute, HTTP requests per task).
* ``bench_sleep__<ex>``: ``BENCH_SLEEP_TASKS`` independent tasks that sleep ``conf["seconds"]``
  (memory with that many tasks running at once).

``<ex>`` is ``local`` (LocalExecutor), ``agent`` (EdgeAgentExecutor, queue ``bench``) or ``edge3``
(the edge3 provider's EdgeExecutor, queue ``default``). A variant exists only when its executor is
in ``AIRFLOW__CORE__EXECUTOR``: the dag-processor refuses a task naming an executor it does not
have, and the agent's task runtime gets the hosted executor string, so both sides build the same
DAG ids. The task counts come from the environment (the harness sets them for the hosted side and
the agent); the defaults are the full benchmark's.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from airflow.sdk import DAG, get_current_context, task

# (key, executor alias as tasks name it, substring of [core] executor that enables it, queue)
VARIANTS = (
    ("local", "LocalExecutor", "LocalExecutor", "default"),
    ("agent", "EdgeAgentExecutor", "EdgeAgentExecutor", "bench"),
    ("edge3", "EdgeExecutor", "edge3.executors.EdgeExecutor", "default"),
)


def _count(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


DISPATCH_TASKS = _count("BENCH_DISPATCH_TASKS", 5)
TRIVIAL_TASKS = _count("BENCH_TRIVIAL_TASKS", 100)
SLEEP_TASKS = _count("BENCH_SLEEP_TASKS", 16)


@task
def noop() -> None:
    """The trivial task: all of its cost is the executor's and the Task SDK's."""


@task
def sleep() -> None:
    conf = get_current_context()["dag_run"].conf or {}
    time.sleep(float(conf.get("seconds", 20)))


def _dag(dag_id: str, **kwargs: object) -> DAG:
    return DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        is_paused_upon_creation=False,
        # Only the executor's own slots may limit concurrency, never the DAG's defaults (16).
        max_active_tasks=1000,
        max_active_runs=1,
        tags=["bench"],
        **kwargs,
    )


_configured = os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
for _key, _alias, _needle, _queue in VARIANTS:
    if _needle not in _configured:
        continue
    _args = {"executor": _alias, "queue": _queue, "retries": 0}
    with _dag(f"bench_dispatch__{_key}", default_args=_args):
        for _i in range(DISPATCH_TASKS):
            noop.override(task_id=f"noop_{_i}")()
    with _dag(f"bench_trivial__{_key}", default_args=_args):
        for _i in range(TRIVIAL_TASKS):
            noop.override(task_id=f"noop_{_i}")()
    with _dag(f"bench_sleep__{_key}", default_args=_args):
        for _i in range(SLEEP_TASKS):
            sleep.override(task_id=f"sleep_{_i}")()
