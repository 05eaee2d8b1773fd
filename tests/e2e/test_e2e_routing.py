"""E2E: queue routing and refusals: an unserved queue, a DAG the agent lacks, the admin listing."""

from __future__ import annotations

import time

import shutil

import pytest
from localstack import StackError

pytestmark = pytest.mark.e2e


def test_registered_agent_is_listed(e2e):
    rows = e2e.stack.list_agents()
    mine = [r for r in rows if r.get("id", r.get("agent_id")) == e2e.agent.agent_id]
    e2e.check(len(mine) == 1, f"agent {e2e.agent.agent_id} not in 'airflow edge-agents list --json': {rows}")
    row = mine[0]
    e2e.check(list(row.get("queues") or []) == ["default"], f"queues bound to the agent: {row}")
    e2e.check(row.get("region") == e2e.region, f"region bound to the agent: {row}")


def test_task_on_unserved_queue_stays_queued(e2e):
    dag_id = "e2e_unserved_queue"
    stack = e2e.stack
    run_id = stack.trigger(dag_id)
    try:
        # Both tasks are queued in the same scheduler loop; once the agent has leased and finished
        # the served one, it has had every chance to take the other, had routing let it.
        try:
            served = stack.wait_ti_state(dag_id, run_id, "served", ("success", "failed"), timeout=180)
        except StackError as exc:
            e2e.fail(f"served task did not finish: {exc}", dag_id, run_id)
        e2e.check(served.state == "success", f"served ended {served.state}", dag_id, run_id)
        e2e.assert_on_agent(dag_id, run_id, served, "served queue task ran")
        stranded = e2e.ti(dag_id, run_id, "stranded")
        e2e.check(stranded.state == "queued", f"stranded is {stranded.state!r}, expected 'queued'", dag_id, run_id)
        e2e.check(stranded.start_date is None, f"stranded has a start date: {stranded}", dag_id, run_id)
        jobs = [j for j in stack.agent_jobs(dag_id, run_id) if j["task_id"] == "stranded"]
        e2e.check(
            len(jobs) == 1 and jobs[0]["state"] == "queued" and not jobs[0]["agent_id"],
            f"stranded job rows: {jobs}", dag_id, run_id,
        )
    finally:
        stack.set_run_state(dag_id, run_id, "failed")
    # Settled by hand, the stranded try must never be leased later: the executor cancels its job.
    deadline = time.monotonic() + 60
    while True:
        jobs = [j for j in stack.agent_jobs(dag_id, run_id) if j["task_id"] == "stranded"]
        if jobs and all(j["state"] == "cancelled" for j in jobs):
            break
        if time.monotonic() > deadline:
            e2e.fail(f"stranded job not cancelled after the run was marked failed: {jobs}", dag_id, run_id)
        time.sleep(1)


def test_dag_missing_on_agent_fails_with_reason(e2e, tmp_path):
    # A second agent whose bundle folder lacks e2e_hosted_only.py (it has the probe helper only).
    folder = tmp_path / "agent-dags"
    folder.mkdir()
    shutil.copy(e2e.dags_dir / "e2e_probe.py", folder / "e2e_probe.py")
    other = e2e.start_agent("e2e-other-folder", ["e2e_other_folder"], concurrency=1, dags_folder=folder)
    try:
        dag_id = "e2e_hosted_only"
        run_id = e2e.run(dag_id, expect="failed")
        ti = e2e.ti(dag_id, run_id, "only_on_hosted")
        e2e.check(ti.state == "failed", f"only_on_hosted ended {ti.state}", dag_id, run_id)
        e2e.check(ti.start_date is None or ti.pid is None, f"the task seems to have started: {ti}", dag_id, run_id)
        jobs = [j for j in e2e.stack.agent_jobs(dag_id, run_id) if j["task_id"] == "only_on_hosted"]
        e2e.check(jobs, "no job row left for the refused task", dag_id, run_id)
        job = jobs[-1]
        e2e.check(job["agent_id"] == other.agent_id and job["state"] == "failed", f"job: {job}", dag_id, run_id)
        reason = job["reason"] or ""
        e2e.check("e2e_hosted_only" in reason, f"the reason does not name the missing file: {reason!r}", dag_id, run_id)
        # The user sees why in the task's log in the UI, not only in the agent's own log.
        e2e.log(dag_id, run_id, ti, "e2e_hosted_only")
    finally:
        other.stop()
