"""E2E: plain tasks on the agent: PythonOperator, XCom between agent tasks, Variables, mixed executors."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.e2e


def test_python_operator_runs_on_agent(e2e):
    run_id = e2e.run("e2e_python_operator")
    ti = e2e.ti("e2e_python_operator", run_id, "hello")
    e2e.check(ti.state == "success", f"hello ended {ti.state}", "e2e_python_operator", run_id)
    e2e.assert_on_agent("e2e_python_operator", run_id, ti, "hello from a PythonOperator on the agent")


def test_xcom_between_two_agent_tasks(e2e):
    dag_id = "e2e_xcom"
    run_id = e2e.run(dag_id)
    produce, consume = e2e.ti(dag_id, run_id, "produce"), e2e.ti(dag_id, run_id, "consume")
    e2e.check(produce.state == consume.state == "success", "tasks did not both succeed", dag_id, run_id)
    e2e.assert_on_agent(dag_id, run_id, produce, "producing payload n=21")
    e2e.assert_on_agent(dag_id, run_id, consume, "consumed payload from producer: doubled=42")
    value = e2e.stack.xcom(dag_id, run_id, "consume")
    e2e.check(value == 42, f"consume's XCom through REST is {value!r}, expected 42", dag_id, run_id)


def test_agent_task_reads_variable(e2e):
    dag_id = "e2e_variable"
    secret_free_value = f"hello-{uuid.uuid4().hex[:8]}"
    e2e.stack.set_variable("e2e_greeting", secret_free_value)
    run_id = e2e.run(dag_id)
    ti = e2e.ti(dag_id, run_id, "read_variable")
    e2e.assert_on_agent(dag_id, run_id, ti, f"variable e2e_greeting={secret_free_value}")


def test_local_and_agent_tasks_in_one_dag(e2e):
    dag_id = "e2e_mixed"
    run_id = e2e.run(dag_id)
    start, middle, end = (e2e.ti(dag_id, run_id, t) for t in ("local_start", "remote_middle", "local_end"))
    e2e.check(
        start.state == middle.state == end.state == "success",
        f"states: {start.state}, {middle.state}, {end.state}", dag_id, run_id,
    )
    e2e.assert_on_hosted(dag_id, run_id, start, "local start produces 5")
    e2e.assert_on_agent(dag_id, run_id, middle, "remote middle got 5, returns 50")
    e2e.assert_on_hosted(dag_id, run_id, end, "local end received 50")
