"""E2E: retries, dynamic task mapping and deferral on the agent."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_failed_try_is_retried_on_agent(e2e):
    dag_id = "e2e_retry"
    run_id = e2e.run(dag_id)
    ti = e2e.ti(dag_id, run_id, "flaky")
    e2e.check(ti.state == "success" and ti.try_number == 2, f"flaky: {ti}", dag_id, run_id)
    tries = e2e.stack.task_tries(dag_id, run_id, "flaky")
    e2e.check([t.try_number for t in tries] == [1, 2], f"tries: {tries}", dag_id, run_id)
    e2e.check(tries[0].state in ("failed", "up_for_retry"), f"try 1 ended {tries[0].state}", dag_id, run_id)
    e2e.assert_on_agent(dag_id, run_id, tries[0], "failing on purpose on try 1", try_number=1)
    e2e.assert_on_agent(dag_id, run_id, ti, "succeeded on try 2", try_number=2)


def test_mapped_task_instances_run_on_agent(e2e):
    dag_id = "e2e_mapped"
    run_id = e2e.run(dag_id)
    mapped = sorted((t for t in e2e.stack.task_instances(dag_id, run_id) if t.task_id == "square"),
                    key=lambda t: t.map_index)
    e2e.check([t.map_index for t in mapped] == [0, 1, 2], f"mapped: {mapped}", dag_id, run_id)
    for ti, x in zip(mapped, (1, 2, 3)):
        e2e.check(ti.state == "success", f"square[{ti.map_index}] ended {ti.state}", dag_id, run_id)
        e2e.assert_on_agent(dag_id, run_id, ti, f"square of {x} is {x * x}")
    total = e2e.ti(dag_id, run_id, "total")
    e2e.assert_on_agent(dag_id, run_id, total, "total of squares is 14")


def test_deferred_task_resumes_on_agent(e2e):
    dag_id = "e2e_deferrable"
    run_id = e2e.run(dag_id)
    ti = e2e.ti(dag_id, run_id, "wait_then_resume")
    e2e.check(ti.state == "success", f"wait_then_resume ended {ti.state}", dag_id, run_id)
    text = e2e.assert_on_agent(dag_id, run_id, ti, "resumed after the trigger fired")
    labels = [p["label"] for p in e2e.probes(text)]
    # Both halves ran on the agent: the one that deferred and the one the trigger's event resumed.
    e2e.check(
        "before-defer" in labels and "after-resume" in labels,
        f"expected both halves in the log, got probes {labels}:\n{text[-3000:]}", dag_id, run_id,
    )
    jobs = [j for j in e2e.stack.agent_jobs(dag_id, run_id) if j["task_id"] == "wait_then_resume"]
    e2e.check(
        len(jobs) in (0, 2),  # 0: already purged; otherwise one job to start and one to resume
        f"expected two agent jobs for a deferred-and-resumed task, got {len(jobs)}", dag_id, run_id,
    )
