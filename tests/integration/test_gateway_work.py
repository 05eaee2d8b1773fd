"""Gateway work routes over real TLS: long-poll leasing, fencing, state reports, log chunks,
heartbeats, draining, and releasing held polls on SIGTERM."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select, update

from edge_agent.protocol import (
    HEARTBEAT_PATH,
    LEASE_PATH,
    HeartbeatResponse,
    Lease,
    LeaseResponse,
    job_logs_path,
    job_state_path,
)
from executor_plugin.models import AgentStatus, JobStatus, agent_table, job_table

SENT = "http11.send_request_body.complete"


class HeldPoll:
    """A lease request in a thread; ``sent`` is set once its body has gone out on the wire."""

    def __init__(self, client: httpx.Client, body: dict[str, Any]) -> None:
        self.sent = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def trace(name: str, _info: dict) -> None:
            if name == SENT:
                self.sent.set()

        def run() -> None:
            try:
                self.response = client.post(LEASE_PATH, json=body, extensions={"trace": trace})
            except BaseException as exc:  # reported by the test
                self.error = exc
            finally:
                self.sent.set()

        self.thread = threading.Thread(target=run, name="held-poll")
        self.thread.start()

    def result(self, timeout: float = 120) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "lease request did not return"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def _lease_now(gateway, agent) -> Lease:
    with gateway.client(agent) as c:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 30})
    assert r.status_code == 200, r.text
    lease = LeaseResponse.model_validate(r.json()).lease
    assert lease is not None
    return lease


def _job_state(gateway, job_id) -> str:
    with gateway.home.session() as s:
        return s.execute(select(job_table.c.state).where(job_table.c.id == job_id)).scalar_one()


def test_long_poll_returns_a_job_queued_while_it_waits(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.client(agent) as c:
        poll = HeldPoll(c, {"free_slots": 1, "wait_seconds": 45})
        assert poll.sent.wait(60)
        job_id = gateway.enqueue(agent.identity.queues[0])
        r = poll.result()
    assert r.status_code == 200, r.text
    lease = LeaseResponse.model_validate(r.json()).lease
    # A lease at all means the wait ended early for the job: a wait that runs out answers null.
    assert lease is not None and lease.job_id == job_id
    assert lease.fencing == 1 and lease.queue == agent.identity.queues[0]
    assert _job_state(gateway, job_id) == JobStatus.LEASED


def test_lease_carries_a_freshly_minted_workload_token(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0], token="stale-scheduler-token")
    lease = _lease_now(gateway, agent)
    assert lease.job_id == job_id
    token = lease.workload["token"]
    assert token != "stale-scheduler-token"
    claims = jwt.decode(token, gateway.home.jwt_secret, algorithms=["HS512"], audience="urn:airflow.apache.org:task")
    assert claims["sub"] == lease.workload["ti"]["id"]
    assert claims["scope"] == "workload"
    assert lease.workload["log_path"].endswith("attempt=1.log")  # the rest of the workload is untouched


def test_agent_only_leases_its_own_queues(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    foreign = gateway.enqueue(gateway.new_queue())
    with gateway.client(agent) as c:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 0.5})
    assert r.status_code == 200 and r.json() == {"lease": None}
    assert _job_state(gateway, foreign) == JobStatus.QUEUED


def test_no_free_slot_and_draining_get_no_lease(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    with gateway.client(agent) as c:
        full = c.post(LEASE_PATH, json={"free_slots": 0, "wait_seconds": 0.5})
        assert full.status_code == 200 and full.json() == {"lease": None}
        with gateway.home.session() as s:
            s.execute(update(agent_table).where(agent_table.c.id == agent.agent_id).values(state=AgentStatus.DRAINING))
            s.commit()
        draining = c.post(LEASE_PATH, json={"free_slots": 4, "wait_seconds": 45})
        hb = c.post(HEARTBEAT_PATH, json={"free_slots": 4, "total_slots": 4, "version": "it"})
    assert draining.status_code == 200 and draining.json() == {"lease": None}
    assert _job_state(gateway, job_id) == JobStatus.QUEUED
    assert hb.status_code == 200 and HeartbeatResponse.model_validate(hb.json()).drain is True


def test_state_reports_check_owner_and_fencing(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    other = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = _lease_now(gateway, agent)
    path = job_state_path(job_id)
    with gateway.client(agent) as c:
        stale = c.post(path, json={"fencing": lease.fencing - 1, "state": "running"})
        unknown = c.post(job_state_path("nope"), json={"fencing": 1, "state": "running"})
        running = c.post(path, json={"fencing": lease.fencing, "state": "running"})
        again = c.post(path, json={"fencing": lease.fencing, "state": "running"})
        bad = c.post(path, json={"fencing": lease.fencing, "state": "exploded"})
    with gateway.client(other) as c:
        foreign = c.post(path, json={"fencing": lease.fencing, "state": "success", "exit_code": 0})
    assert stale.status_code == 409
    assert unknown.status_code == 404 and foreign.status_code == 404
    assert running.status_code == 204 and again.status_code == 204
    assert bad.status_code == 422
    with gateway.client(agent) as c:
        done = c.post(path, json={"fencing": lease.fencing, "state": "failed", "exit_code": 3, "reason": "boom"})
        late = c.post(path, json={"fencing": lease.fencing, "state": "success", "exit_code": 0})
    assert done.status_code == 204
    assert late.status_code == 409  # a finished job does not change its outcome
    with gateway.home.session() as s:
        row = s.execute(select(job_table).where(job_table.c.id == job_id)).one()
    assert (row.state, row.exit_code, row.reason) == (JobStatus.FAILED, 3, "boom")


def test_log_chunks_are_appended_once_by_offset(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0], task_id="logs", log_path="dag_id=d/run_id=r/task_id=logs/attempt=1.log")
    lease = _lease_now(gateway, agent)
    path = job_logs_path(job_id)
    first, second = "line one\n", "line twö\n"
    with gateway.client(agent) as c:
        r1 = c.post(path, json={"fencing": lease.fencing, "offset": 0, "data": first})
        resent = c.post(path, json={"fencing": lease.fencing, "offset": 0, "data": first})  # response lost
        overlap = c.post(path, json={"fencing": lease.fencing, "offset": 5, "data": first[5:] + second})
        gap = c.post(path, json={"fencing": lease.fencing, "offset": 10_000, "data": "x"})
        stale = c.post(path, json={"fencing": lease.fencing + 1, "offset": 0, "data": "x"})
        negative = c.post(path, json={"fencing": lease.fencing, "offset": -1, "data": "x"})
    assert [r.status_code for r in (r1, resent, overlap)] == [204, 204, 204]
    assert gap.status_code == 409 and str(len((first + second).encode())) in gap.json()["detail"]
    assert stale.status_code == 409
    assert negative.status_code == 422
    log_file = gateway.home.log_folder / "dag_id=d/run_id=r/task_id=logs/attempt=1.log"
    assert log_file.read_text(encoding="utf-8") == first + second


def test_heartbeat_renews_held_jobs_and_names_lost_ones(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = _lease_now(gateway, agent)
    body = {
        "free_slots": 3,
        "total_slots": 4,
        "version": "it",
        "running": [{"job_id": job_id, "fencing": lease.fencing}, {"job_id": "gone", "fencing": 1}],
    }
    with gateway.client(agent) as c:
        r = c.post(HEARTBEAT_PATH, json=body)
        bad = c.post(HEARTBEAT_PATH, json={"free_slots": -1, "total_slots": 4, "version": "it"})
    assert r.status_code == 200, r.text
    assert HeartbeatResponse.model_validate(r.json()) == HeartbeatResponse(drain=False, lost=["gone"])
    assert bad.status_code == 422
    with gateway.home.session() as s:
        row = s.execute(select(agent_table).where(agent_table.c.id == agent.agent_id)).one()
    assert (row.slots_free, row.slots_total, row.version) == (3, 4, "it")


@pytest.mark.parametrize(
    "body",
    [
        {"free_slots": -1},
        {"free_slots": 1, "wait_seconds": 3600},
        {"free_slots": 1, "queues": ["admin"]},
        {"free_slots": "many"},
    ],
)
def test_malformed_lease_bodies_are_422(gateway, tmp_path, body):
    agent = gateway.register(tmp_path)
    with gateway.client(agent) as c:
        assert c.post(LEASE_PATH, json=body).status_code == 422


def test_abandoned_poll_does_not_swallow_the_next_job(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    # The client gives up after 2 s and closes its connection while the server still holds the poll.
    with gateway.client(agent, timeout=httpx.Timeout(60, read=2)) as c, pytest.raises(httpx.ReadTimeout):
        c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 45})
    job_id = gateway.enqueue(agent.identity.queues[0])
    lease = _lease_now(gateway, agent)
    assert lease.job_id == job_id


def test_sigterm_answers_held_polls_and_exits_cleanly(start_gateway, tmp_path):
    gw = start_gateway()
    agent = gw.register(tmp_path)
    with gw.client(agent) as c:
        poll = HeldPoll(c, {"free_slots": 1, "wait_seconds": 45})
        assert poll.sent.wait(60)
        code = gw.stop()
        r = poll.result()
    assert code == 0, gw.log_text()
    assert r.status_code == 200 and r.json() == {"lease": None}
    assert "gateway stopped" in gw.log_text()
