"""Attacks on Airflow's Execution API through the gateway: acting on a task instance leased to
another agent, with that agent's own (stolen) task token.

Proof that Airflow never saw the call: the request is one Airflow would accept (the same call by
the lease holder succeeds afterwards), and the task instance row did not move.
"""

from __future__ import annotations

from secsupport import (
    add_queued_task_instance,
    enqueue_for,
    enroll,
    job_row,
    lease_job,
    run_payload,
    task_instance_row,
)

from edge_agent.protocol import job_state_path

NOT_LEASED = "task instance is not leased to this agent"


def _run(client, ti_id: str, token: str):
    return client.patch(
        f"/execution/task-instances/{ti_id}/run", json=run_payload(), headers={"authorization": f"Bearer {token}"}
    )


def test_stolen_task_token_from_another_agent_is_403_and_airflow_never_sees_it(gateway, tmp_path):
    queue = gateway.new_queue()
    holder = enroll(gateway, tmp_path, queues=[queue])
    thief = enroll(gateway, tmp_path, queues=[queue])  # same queue: only the lease tells them apart
    ti = add_queued_task_instance(gateway, queue=queue)
    job_id = enqueue_for(gateway, ti, queue)
    held = lease_job(gateway, holder, job_id)
    token = held.workload["token"]
    ti_before, job_before = task_instance_row(gateway, ti.id), job_row(gateway, job_id)
    with gateway.client(thief) as c:
        stolen = _run(c, ti.id, token)
        heartbeat = c.put(
            f"/execution/task-instances/{ti.id}/heartbeat",
            json={"hostname": "sec-host", "pid": 4242},
            headers={"authorization": f"Bearer {token}"},
        )
    assert stolen.status_code == 403 and stolen.json() == {"detail": NOT_LEASED}
    assert heartbeat.status_code == 403 and heartbeat.json() == {"detail": NOT_LEASED}
    assert task_instance_row(gateway, ti.id) == ti_before
    assert job_row(gateway, job_id) == job_before
    # Control: the very same call from the lease holder reaches Airflow and starts the task.
    with gateway.client(holder) as c:
        ok = _run(c, ti.id, token)
    assert ok.status_code == 200, ok.text
    assert task_instance_row(gateway, ti.id)["state"] == "running"


def test_execution_call_without_a_task_token_is_403(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = enroll(gateway, tmp_path, queues=[queue])
    ti = add_queued_task_instance(gateway, queue=queue)
    lease_job(gateway, agent, enqueue_for(gateway, ti, queue))
    before = task_instance_row(gateway, ti.id)
    with gateway.client(agent) as c:
        bare = c.patch(f"/execution/task-instances/{ti.id}/run", json=run_payload())
        forged = c.patch(
            f"/execution/task-instances/{ti.id}/run", json=run_payload(),
            headers={"authorization": "Bearer not.a.jwt"},
        )
        variables = c.get("/execution/variables/secret_key")
    assert (bare.status_code, forged.status_code, variables.status_code) == (403, 403, 403)
    assert task_instance_row(gateway, ti.id) == before


def test_task_token_is_refused_once_the_agent_no_longer_holds_the_job(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = enroll(gateway, tmp_path, queues=[queue])
    ti = add_queued_task_instance(gateway, queue=queue)
    job_id = enqueue_for(gateway, ti, queue)
    held = lease_job(gateway, agent, job_id)
    # The agent's local policy refuses it: the lease ends, and with it the right to act on the TI.
    # (Never having called the Execution API, no binding is cached for this agent and TI.)
    with gateway.client(agent) as c:
        refused = c.post(job_state_path(job_id), json={"fencing": held.fencing, "state": "refused", "reason": "x"})
        assert refused.status_code == 204
        before = task_instance_row(gateway, ti.id)
        late = _run(c, ti.id, held.workload["token"])
    assert late.status_code == 403 and late.json() == {"detail": NOT_LEASED}
    assert task_instance_row(gateway, ti.id) == before


def test_two_authorization_headers_are_refused(gateway, tmp_path):
    # One header for our binding check and another for Airflow would split the decision: refused.
    queue = gateway.new_queue()
    holder = enroll(gateway, tmp_path, queues=[queue])
    thief = enroll(gateway, tmp_path, queues=[queue])
    own_ti = add_queued_task_instance(gateway, queue=queue)
    victim_ti = add_queued_task_instance(gateway, queue=queue)
    own = lease_job(gateway, thief, enqueue_for(gateway, own_ti, queue))
    victim = lease_job(gateway, holder, enqueue_for(gateway, victim_ti, queue))
    before = task_instance_row(gateway, victim_ti.id)
    with gateway.client(thief) as c:
        r = c.patch(
            f"/execution/task-instances/{victim_ti.id}/run",
            json=run_payload(),
            headers=[
                ("authorization", f"Bearer {own.workload['token']}"),
                ("authorization", f"Bearer {victim.workload['token']}"),
            ],
        )
    assert r.status_code == 403
    assert task_instance_row(gateway, victim_ti.id) == before
