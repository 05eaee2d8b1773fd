"""The agent's loops against a fake gateway (httpx.MockTransport) and a fake runtime.

The gateway and the runtime are faked at their edges (the HTTP transport, the runtime's
start/submit/cancel/stop + callbacks contract); the agent, its loops, the AgentAPI client, the status
file and the Unix-socket forwarder are the real ones. Waits are on conditions, never on durations.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import trustme

from edge_agent import protocol as p
from edge_agent.agent import Agent
from edge_agent.client import AgentAPI
from edge_agent.config import DEFAULT_DRAIN_GRACE, AgentConfig
from edge_agent.errors import ConfigError, IdentityRejected, RuntimeUnavailable
from edge_agent.identity.keystore import StoredIdentity
from edge_agent.logship import CHUNK_BYTES, read_chunk
from edge_agent.runtime import EXIT_DUPLICATE, EXIT_NOT_STARTED

WAIT = 60.0  # generous: the machine is shared; nothing asserts on durations


class FakeGateway:
    """The agent API as a MockTransport handler: hands out queued leases, records every call."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, str, Any]] = []  # (method, path, json body)
        self.leases: list[p.Lease] = []
        self.logs: dict[str, bytearray] = {}
        self.status_for: dict[str, int] = {}  # path -> forced status code
        self.drain = False
        self.lost: list[str] = []
        self.closed = False
        self.fencing = 0

    # -- test side ------------------------------------------------------------------------------

    def queue(self, job_id: str, *, dag_id: str = "dag", queue: str = "default",
              log_policy: p.LogPolicy = p.LogPolicy.HOSTED) -> None:
        with self.cond:
            self.fencing += 1
            self.leases.append(p.Lease(
                job_id=job_id, fencing=self.fencing, queue=queue, dag_id=dag_id, task_id=f"task_{job_id}",
                run_id="run1", map_index=-1, try_number=1, log_policy=log_policy,
                workload={"ti": {"id": job_id, "dag_id": dag_id, "task_id": f"task_{job_id}", "run_id": "run1",
                                 "map_index": -1, "try_number": 1, "queue": queue},
                          "bundle_info": {"name": "dags-folder", "version": None}, "token": "jwt"},
                lease_expires_at=datetime.now(timezone.utc) + timedelta(minutes=1)))
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=WAIT), f"timed out waiting for {what}; calls: {self.paths()}"

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.calls]

    def states(self, job_id: str) -> list[dict]:
        return [body for _, path, body in self.calls if path == p.job_state_path(job_id)]

    def count(self, path: str) -> int:
        return sum(1 for _, pth, _ in self.calls if pth == path)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- gateway side ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content and path.startswith("/agents") else None
        with self.cond:
            self.calls.append((request.method, path, body))
            self.cond.notify_all()
            forced = self.status_for.get(path)
        if forced:
            return httpx.Response(forced, json={"detail": f"forced {forced}"})
        if path == p.WHOAMI_PATH:
            return httpx.Response(200, json={"agent_id": "ag_1", "name": "edge-1", "queues": ["default"],
                                             "region": "eu", "state": "active"})
        if path == p.LEASE_PATH:
            with self.cond:
                self.cond.wait_for(lambda: self.leases or self.closed, timeout=body["wait_seconds"])
                lease = self.leases.pop(0) if self.leases and not self.closed else None
            return httpx.Response(200, json={"lease": lease.model_dump(mode="json") if lease else None})
        if path == p.HEARTBEAT_PATH:
            with self.cond:
                lost, self.lost = self.lost, []
                return httpx.Response(200, json={"drain": self.drain, "lost": lost})
        m = re.fullmatch(r"/agents/v1/jobs/(.+)/logs", path)
        if m:
            with self.cond:
                copy = self.logs.setdefault(m.group(1), bytearray())
                data = body["data"].encode()
                if body["offset"] > len(copy):
                    return httpx.Response(409, json={
                        "detail": f"log chunk starts at byte {body['offset']} but the log has {len(copy)} bytes"})
                copy.extend(data[len(copy) - body["offset"]:])
            return httpx.Response(204)
        if path.startswith("/agents/v1/jobs/"):
            return httpx.Response(204)
        if path.startswith("/execution/"):
            return httpx.Response(200, json={"relayed": path}, headers={"refreshed-api-token": "fresh"})
        return httpx.Response(404, json={"detail": "no route"})


class FakeRuntime:
    """The runtime contract: submit -> on_started (with a log file) -> ... -> on_exited, cancel, stop."""

    def __init__(self, config: AgentConfig, on_started, on_exited) -> None:
        self.log_folder = config.log_folder
        self.on_started, self.on_exited = on_started, on_exited
        self.cond = threading.Condition()
        self.running: dict[str, Path] = {}
        self.cancels: list[tuple[str, str]] = []
        self.submitted: list[str] = []
        self.alive = False
        self.stopped = False
        #: job id -> (exit code, reason) for a job that exits without starting
        self.not_started: dict[str, tuple[int, str]] = {}

    def start(self) -> None:
        self.alive = True

    def submit(self, job_id: str, workload: dict, socket_path: str) -> None:
        assert Path(socket_path).exists(), "the forwarder must listen before jobs are submitted"
        with self.cond:
            self.submitted.append(job_id)
            self.cond.notify_all()
        if job_id in self.not_started:
            code, reason = self.not_started[job_id]
            threading.Thread(target=self.on_exited, args=(job_id, code, reason)).start()
            return
        log_file = self.log_folder / f"dag_id=dag/{job_id}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f'{{"event": "starting {job_id}"}}\n')
        with self.cond:
            self.running[job_id] = log_file
        self.on_started(job_id, 4000 + len(self.submitted), str(log_file))

    def write(self, job_id: str, text: str) -> None:
        with open(self.running[job_id], "a") as fh:
            fh.write(text)

    def finish(self, job_id: str, code: int, reason: str | None = None) -> None:
        with self.cond:
            if self.running.pop(job_id, None) is None:
                return
        self.on_exited(job_id, code, reason)

    def cancel(self, job_id: str, reason: str, grace: float | None = None) -> bool:
        with self.cond:
            self.cancels.append((job_id, reason))
            self.cond.notify_all()
        self.finish(job_id, 143, f"cancelled: {reason}")
        return True

    def stop(self) -> None:
        self.stopped = True
        self.alive = False
        for job_id in list(self.running):
            self.finish(job_id, 71, "the runtime was stopped")

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=WAIT), f"timed out waiting for {what}"


@pytest.fixture(scope="module")
def identity() -> StoredIdentity:
    ca = trustme.CA()
    leaf = ca.issue_cert("agent.test")
    return StoredIdentity(
        agent_id="ag_1", name="edge-1", queues=("default",), region="eu", url="https://gw.test",
        executor="executor_plugin.executor.EdgeAgentExecutor",
        cert_not_after=datetime.now(timezone.utc) + timedelta(hours=24),
        cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(ca.cert_pem.bytes().decode(),),
        key_pem=leaf.private_key_pem.bytes(),
    )


class Harness:
    def __init__(self, tmp_path: Path, identity: StoredIdentity, concurrency: int,
                 api_factory: Callable[[], AgentAPI] | None = None, drain_grace: float = DEFAULT_DRAIN_GRACE,
                 **agent_kwargs: Any) -> None:
        self.gw = FakeGateway()
        self.config = AgentConfig(state_dir=tmp_path, concurrency=concurrency, lease_wait=2.0,
                                  heartbeat_interval=0.5, request_timeout=10.0, drain_grace=drain_grace,
                                  cancel_grace=WAIT)
        self.runtime: FakeRuntime | None = None
        self.rt_ready = threading.Event()
        api_factory_override = api_factory

        def runtime_factory(config, ident, on_started, on_exited) -> FakeRuntime:
            self.runtime = FakeRuntime(config, on_started, on_exited)
            self.rt_ready.set()
            return self.runtime

        def api_factory() -> AgentAPI:
            return AgentAPI(httpx.Client(base_url="https://gw.test", transport=httpx.MockTransport(self.gw.handle)))

        self.agent = Agent(self.config, identity, api_factory_override or api_factory,
                           runtime_factory=runtime_factory, **agent_kwargs)
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="agent-under-test")

    def _run(self) -> None:
        try:
            self.result["code"] = self.agent.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.result["error"] = exc

    def start(self) -> "Harness":
        self.thread.start()
        assert self.rt_ready.wait(WAIT)
        return self

    @property
    def rt(self) -> FakeRuntime:
        assert self.runtime is not None
        return self.runtime

    def join(self) -> dict[str, Any]:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "agent did not stop"
        return self.result

    def status(self) -> dict:
        return json.loads((self.config.state_dir / "status.json").read_text())


@pytest.fixture()
def harness(tmp_path: Path, identity: StoredIdentity) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(concurrency: int = 2, ident: StoredIdentity = identity, api_factory=None, **agent_kwargs) -> Harness:
        h = Harness(tmp_path, ident, concurrency, api_factory, **agent_kwargs)
        made.append(h)
        return h

    yield make
    for h in made:  # never leave an agent thread behind, whatever the test did
        if h.thread.is_alive():
            h.agent.abort("test teardown")
            h.gw.close()
            h.thread.join(WAIT)


# -- tests --------------------------------------------------------------------------------------


def test_job_lifecycle_reports_in_order_and_ships_the_whole_log(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    assert h.gw.states("j1")[0] == {"fencing": 1, "state": "running", "exit_code": None, "reason": None}
    h.gw.wait_for(lambda: h.gw.logs.get("j1"), "first log chunk")

    h.rt.write("j1", '{"event": "working"}\n{"event": "unfinished line, no newline')
    h.rt.finish("j1", 0)
    h.gw.wait_for(lambda: len(h.gw.states("j1")) == 2, "final report")
    assert h.gw.states("j1")[1] == {"fencing": 1, "state": "success", "exit_code": 0, "reason": None}
    # The final state comes after the final flush: the gateway's copy is the whole file, partial line included.
    log_path = h.config.log_folder / "dag_id=dag/j1.log"
    assert bytes(h.gw.logs["j1"]) == log_path.read_bytes()
    last_log = max(i for i, (_, path, _) in enumerate(h.gw.calls) if path == p.job_logs_path("j1"))
    final = max(i for i, (_, path, _) in enumerate(h.gw.calls) if path == p.job_state_path("j1"))
    assert last_log < final

    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert h.rt.stopped
    assert h.status()["state"] == "stopped"


def test_job_that_never_started_is_reported_failed_with_its_reason(harness) -> None:
    h = harness()
    h.start()
    h.rt.not_started["j2"] = (EXIT_NOT_STARTED, "DAG file dags/x.py not found on this agent")
    h.gw.queue("j2")
    h.gw.wait_for(lambda: h.gw.states("j2"), "final report")
    assert h.gw.states("j2") == [{"fencing": 1, "state": "failed", "exit_code": EXIT_NOT_STARTED,
                                  "reason": "DAG file dags/x.py not found on this agent"}]
    # The user sees why in the task's log in the UI, not only in the agent's own log.
    (line,) = bytes(h.gw.logs["j2"]).decode().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["timestamp"].endswith("Z")
    assert entry["event"] == "edge-agent edge-1 (ag_1): DAG file dags/x.py not found on this agent"
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_duplicate_delivery_is_not_reported_as_a_failure(harness) -> None:
    h = harness().start()
    h.gw.queue("j3")
    h.gw.wait_for(lambda: h.gw.states("j3"), "RUNNING report")
    h.rt.finish("j3", EXIT_DUPLICATE, "task instance already running")
    h.gw.wait_for(lambda: h.agent.jobs.free_slots() == 2, "slot released")
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert [s["state"] for s in h.gw.states("j3")] == ["running"]


def test_leases_only_while_a_slot_is_free(harness) -> None:
    h = harness(concurrency=1).start()
    h.gw.queue("a")
    h.gw.queue("b")
    h.gw.wait_for(lambda: h.gw.states("a"), "job a running")
    beats = h.gw.count(p.HEARTBEAT_PATH)
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= beats + 2, "two more heartbeats")
    assert h.gw.count(p.LEASE_PATH) == 1  # no slot, no lease request
    assert h.rt.submitted == ["a"]
    hb = [body for _, path, body in h.gw.calls if path == p.HEARTBEAT_PATH][-1]
    assert hb["free_slots"] == 0 and hb["total_slots"] == 1 and hb["running"] == [{"job_id": "a", "fencing": 1}]

    h.rt.finish("a", 1)
    h.gw.wait_for(lambda: h.gw.states("b"), "job b running")
    lease_bodies = [body for _, path, body in h.gw.calls if path == p.LEASE_PATH]
    assert lease_bodies[1]["free_slots"] == 1
    assert h.gw.states("a")[-1]["state"] == "failed" and h.gw.states("a")[-1]["exit_code"] == 1
    h.rt.finish("b", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_drain_stops_leasing_finishes_the_job_and_keeps_heartbeating(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    h.agent.stop_gracefully("SIGTERM received")
    # The poll in flight ends after lease_wait; no new one is made.
    h.gw.wait_for(lambda: h.status()["activity"].get("lease") == "stopped: not asking for work", "lease loop stops")
    leases = h.gw.count(p.LEASE_PATH)
    beats = h.gw.count(p.HEARTBEAT_PATH)
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= beats + 2, "heartbeats during the drain")
    assert h.status()["state"] == "draining"
    h.gw.queue("late")  # must not be leased while draining
    h.rt.finish("j1", 0)
    assert h.join() == {"code": 0}
    assert h.gw.count(p.LEASE_PATH) == leases
    assert h.gw.states("j1")[-1]["state"] == "success"
    assert h.rt.cancels == []


def test_second_stop_cancels_running_jobs_and_reports_them(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    h.agent.stop_gracefully("SIGTERM")
    h.agent.stop_now("SIGTERM twice")
    assert h.join() == {"code": 0}
    assert h.rt.cancels == [("j1", "agent stopping now (second stop request)")]
    final = h.gw.states("j1")[-1]
    assert final["state"] == "failed" and final["exit_code"] == 143 and "cancelled" in final["reason"]
    local = (h.config.log_folder / "dag_id=dag/j1.log").read_bytes()
    hosted = bytes(h.gw.logs["j1"])
    assert hosted.startswith(local) and b"cancelled: agent stopping now" in hosted[len(local):]


def test_lost_job_is_cancelled_and_not_reported(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    with h.gw.cond:
        h.gw.lost = ["j1"]
    h.rt.wait_for(lambda: h.rt.cancels, "cancel of the lost job")
    assert h.rt.cancels[0][0] == "j1" and "lease lost" in h.rt.cancels[0][1]
    h.gw.wait_for(lambda: h.agent.jobs.free_slots() == 2, "slot released")
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert [s["state"] for s in h.gw.states("j1")] == ["running"]


def test_revoked_identity_cancels_jobs_and_stops_the_agent(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    with h.gw.cond:
        h.gw.status_for[p.HEARTBEAT_PATH] = 403
    result = h.join()
    assert isinstance(result.get("error"), IdentityRejected) and result["error"].revoked
    assert h.rt.cancels and h.rt.cancels[0][0] == "j1" and "revoked" in h.rt.cancels[0][1]


def test_revoked_at_start_fails_fast(harness) -> None:
    h = harness()
    h.gw.status_for[p.WHOAMI_PATH] = 403
    h.thread.start()
    result = h.join()
    assert isinstance(result.get("error"), IdentityRejected)
    assert h.runtime is None  # the runtime never started


def test_dead_runtime_stops_the_agent(harness) -> None:
    h = harness().start()
    h.gw.wait_for(lambda: h.gw.count(p.LEASE_PATH) >= 1, "first lease request")
    h.rt.alive = False
    h.gw.close()  # end the poll in flight
    assert isinstance(h.join().get("error"), RuntimeUnavailable)


def test_server_drain_pauses_leasing_until_lifted(harness) -> None:
    h = harness().start()
    with h.gw.cond:
        h.gw.drain = True
    h.gw.wait_for(lambda: "paused" in h.status()["activity"].get("lease", ""), "leasing paused")
    leases = h.gw.count(p.LEASE_PATH)
    beats = h.gw.count(p.HEARTBEAT_PATH)
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= beats + 2, "heartbeats while paused")
    assert h.gw.count(p.LEASE_PATH) <= leases + 1  # at most the poll that was in flight
    with h.gw.cond:
        h.gw.drain = False
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "job leased after the drain was lifted")
    h.rt.finish("j1", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_log_gap_resends_from_where_the_gateway_copy_ends(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.logs.get("j1"), "first chunk")
    with h.gw.cond:
        h.gw.logs["j1"] = bytearray()  # the gateway lost its copy
    h.rt.write("j1", '{"event": "more"}\n')
    h.rt.finish("j1", 0)
    h.gw.wait_for(lambda: len(h.gw.states("j1")) == 2, "final report")
    assert bytes(h.gw.logs["j1"]) == (h.config.log_folder / "dag_id=dag/j1.log").read_bytes()
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_status_file_says_what_the_agent_is_doing(harness) -> None:
    h = harness().start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    h.gw.wait_for(lambda: (h.status().get("last_heartbeat") or {}).get("ok")
                  and h.status()["jobs"] and h.status()["jobs"][0]["phase"] == "running", "status file")
    st = h.status()
    assert st["pid"] == os.getpid() and st["agent_id"] == "ag_1" and st["state"] == "running"
    assert (st["free_slots"], st["total_slots"]) == (1, 2)
    assert st["gateway_reachable"] is True
    assert st["jobs"][0]["job_id"] == "j1" and st["jobs"][0]["pid"] and st["jobs"][0]["dag_id"] == "dag"
    assert {"agent", "lease", "heartbeat", "logship"} <= set(st["activity"])
    assert "PRIVATE KEY" not in json.dumps(st)
    h.rt.finish("j1", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_every_log_line_about_a_job_carries_its_job_and_task_instance(harness, caplog) -> None:
    # --log-format json turns these record attributes into fields; a line naming the job without
    # them cannot be found by a log search on the task.
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    h = harness().start()
    h.gw.queue("jlog")
    h.gw.wait_for(lambda: h.gw.states("jlog"), "the RUNNING report")
    h.rt.finish("jlog", 0)
    h.gw.wait_for(lambda: len(h.gw.states("jlog")) == 2, "the final report")
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    about = [r for r in caplog.records if "jlog" in r.getMessage()]
    assert {"leased", "started", "exited", "reported"} <= {w for r in about for w in r.getMessage().split()}
    bare = [r.getMessage() for r in about if getattr(r, "task_id", None) != "task_jlog"
            or getattr(r, "job_id", None) != "jlog" or getattr(r, "try_number", None) != 1]
    assert bare == []


def test_forwarder_relays_execution_calls_over_the_agent_client(harness) -> None:
    h = harness().start()
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= 1, "agent up")
    sock = h.agent.socket_path
    assert sock is not None and sock.exists()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://forwarder") as c:
        resp = c.get("/execution/health", headers={"authorization": "Bearer task-token"})
    assert resp.status_code == 200 and resp.json() == {"relayed": "/execution/health"}
    assert resp.headers["refreshed-api-token"] == "fresh"
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert not sock.exists()


def test_one_agent_per_state_dir(harness) -> None:
    first = harness().start()
    first.gw.wait_for(lambda: first.gw.count(p.HEARTBEAT_PATH) >= 1, "first agent up")
    second = harness()
    second.thread.start()
    error = second.join().get("error")
    assert isinstance(error, ConfigError) and "already uses" in str(error)
    first.agent.stop_gracefully("test")
    assert first.join() == {"code": 0}


def test_signals_escalate_drain_then_cancel(tmp_path: Path, identity: StoredIdentity) -> None:
    from edge_agent import signals

    h = Harness(tmp_path, identity, 2)
    h.gw.queue("j1")

    def operator() -> None:
        h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
        os.kill(os.getpid(), signal.SIGTERM)
        h.gw.wait_for(lambda: h.status()["state"] == "draining", "drain")
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=operator)
    restore = signals.install(h.agent)
    try:
        t.start()
        assert h.agent.run() == 0  # on the main thread, where signal handlers run
    finally:
        restore()
        t.join(WAIT)
    assert h.rt.cancels and h.rt.cancels[0][0] == "j1"
    assert h.gw.states("j1")[-1]["state"] == "failed"


def test_certificate_dropped_at_tls_level_stops_the_agent(harness) -> None:
    # uvicorn under TLS 1.3 drops a connection whose client certificate it refuses: the client only
    # sees "server disconnected". This server does the same for any client certificate, and answers
    # anonymous calls, as the gateway does for the trust bundle.
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edge_agent.transport import build_client

    server_ca, agent_ca = trustme.CA(), trustme.CA()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.connection.getpeercert():
                self.close_connection = True  # refused: no answer at all
                return
            body = json.dumps({"ca_pems": [server_ca.cert_pem.bytes().decode()], "trust_domain": "t"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _any

        def log_message(self, *args: object) -> None:
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    agent_ca.configure_trust(ctx)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    serving.start()
    try:
        leaf = agent_ca.issue_cert("agent.test")
        ident = StoredIdentity(
            agent_id="ag_1", name="edge-1", queues=(), region="eu", url=f"https://127.0.0.1:{server.server_address[1]}",
            executor="x", cert_not_after=datetime.now(timezone.utc) + timedelta(hours=1),
            cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(server_ca.cert_pem.bytes().decode(),),
            key_pem=leaf.private_key_pem.bytes(),
        )
        h = harness(ident=ident, api_factory=lambda: AgentAPI(build_client(ident.url, ident, 10)))
        h.thread.start()
        error = h.join().get("error")
        assert isinstance(error, IdentityRejected) and "refuses this agent's certificate" in str(error)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()


# -- local policy, audit log, log policy ----------------------------------------------------------


def audit_entries(h: Harness) -> list[dict]:
    return [json.loads(line) for line in (h.config.state_dir / "audit.log").read_text().splitlines()]


def test_the_audit_log_records_a_run_only_when_airflow_accepts_the_try(harness) -> None:
    h = harness().start()
    h.gw.queue("J1")
    h.gw.wait_for(lambda: h.gw.states("J1"), "the RUNNING report")
    h.gw.status_for["/execution/task-instances/refused/run"] = 409
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(h.agent.socket_path)), base_url="http://fw") as c:
        assert c.get("/execution/task-instances/j1/run").status_code == 200  # not a PATCH
        assert c.patch("/execution/task-instances/refused/run", json={}).status_code == 409  # not accepted
        assert c.patch("/execution/task-instances/other/run", json={}).status_code == 200  # not our try
        assert c.patch("/execution/task-instances/j1/state", json={}).status_code == 200  # not /run
        assert not [e for e in audit_entries(h) if e["event"] == "run"]
        # The workload names the try "J1"; Airflow's ids are UUIDs, compared without case.
        assert c.patch("/execution/task-instances/j1/run", json={}).status_code == 200
        # Written after the reply (off the task's wait); the next request on this connection is
        # served by the same forwarder thread, so it waits for the audit write to be done.
        assert c.get("/execution/health").status_code == 200
    (run,) = [e for e in audit_entries(h) if e["event"] == "run"]
    assert run["job_id"] == "J1" and run["fencing"] == 1 and run["ti"]["task_id"] == "task_J1"
    h.rt.finish("J1", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert [e["event"] for e in audit_entries(h) if e.get("job_id") == "J1"] == ["decision", "start", "run", "finish"]


def test_refused_job_is_reported_with_its_reason_and_never_reaches_the_runtime(harness, tmp_path: Path) -> None:
    from edge_agent.audit import verify
    from edge_agent.policy import Policy

    policy = Policy(source=tmp_path / "policy.toml", allowed_dags=("finance_*",))
    h = harness(policy=policy).start()
    h.gw.queue("bad", dag_id="hr_payroll")
    h.gw.queue("good", dag_id="finance_daily")
    h.gw.wait_for(lambda: h.gw.states("bad") and h.gw.states("good"), "both reports")
    reason = f"dag 'hr_payroll' not in allowed_dags of {tmp_path / 'policy.toml'}"
    assert h.gw.states("bad") == [{"fencing": 1, "state": "refused", "exit_code": None, "reason": reason}]
    assert h.rt.submitted == ["good"]  # the refused job never reached the runtime
    assert "bad" not in h.gw.logs
    h.rt.finish("good", 0)
    h.gw.wait_for(lambda: len(h.gw.states("good")) == 2, "final report of the accepted job")
    h.gw.wait_for(lambda: h.agent.jobs.free_slots() == 2, "slots released")
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}

    entries = audit_entries(h)
    decisions = {e["job_id"]: e for e in entries if e["event"] == "decision"}
    assert decisions["bad"]["decision"] == "refused" and decisions["bad"]["reason"] == reason
    assert decisions["bad"]["ti"] == {"dag_id": "hr_payroll", "task_id": "task_bad", "run_id": "run1",
                                      "map_index": -1, "try_number": 1}
    assert decisions["good"]["decision"] == "accepted" and decisions["good"]["queue"] == "default"
    assert decisions["good"]["bundle"] == "dags-folder" and decisions["good"]["logs"] == "hosted"
    (finish,) = [e for e in entries if e["event"] == "finish"]
    assert finish["job_id"] == "good" and finish["exit_code"] == 0
    assert verify(h.config.state_dir).ok


def test_an_audit_log_that_cannot_be_written_refuses_the_job_and_stops_the_agent(harness) -> None:
    from edge_agent.errors import AuditError

    h = harness().start()
    h.gw.wait_for(lambda: h.gw.count(p.LEASE_PATH) >= 1, "first lease request")
    assert h.agent.audit is not None

    def broken(*args: Any, **kwargs: Any) -> dict:
        raise AuditError("cannot write the audit log: No space left on device")

    h.agent.audit.append = broken  # type: ignore[method-assign]
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "refusal")
    assert h.gw.states("j1")[0]["state"] == "refused" and "No space left" in h.gw.states("j1")[0]["reason"]
    assert h.rt.submitted == []
    error = h.join().get("error")
    assert isinstance(error, AuditError)


def test_local_log_policy_ships_no_log_and_no_reason(harness) -> None:
    h = harness().start()
    h.rt.not_started["j2"] = (EXIT_NOT_STARTED, "DAG file dags/x.py not found on this agent")
    h.gw.queue("j1", log_policy=p.LogPolicy.LOCAL)
    h.gw.queue("j2", log_policy=p.LogPolicy.LOCAL)
    h.gw.wait_for(lambda: h.gw.states("j1") and h.gw.states("j2"), "reports")
    h.rt.write("j1", '{"event": "customer data"}\n')
    h.rt.finish("j1", 1, "task failed with secret detail")
    h.gw.wait_for(lambda: len(h.gw.states("j1")) == 2, "final report")
    assert h.gw.states("j1") == [{"fencing": 1, "state": "running", "exit_code": None, "reason": None},
                                 {"fencing": 1, "state": "failed", "exit_code": 1, "reason": None}]
    assert h.gw.states("j2") == [{"fencing": 2, "state": "failed", "exit_code": EXIT_NOT_STARTED, "reason": None}]
    assert not any("/logs" in path for path in h.gw.paths())  # not one chunk left the machine
    assert b"customer data" in (h.config.log_folder / "dag_id=dag/j1.log").read_bytes()  # kept locally
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    assert {e["logs"] for e in audit_entries(h) if e.get("job_id") == "j1"} == {"local"}


def test_the_audit_chain_survives_a_restart(harness) -> None:
    from edge_agent.audit import verify

    for job in ("a", "b"):
        h = harness().start()
        h.gw.queue(job)
        h.gw.wait_for(lambda: h.gw.states(job), "running")
        h.rt.finish(job, 0)
        h.gw.wait_for(lambda: len(h.gw.states(job)) == 2, "final report")
        h.agent.stop_gracefully("test")
        assert h.join() == {"code": 0}
    result = verify(h.config.state_dir)
    assert result.ok and result.entries == 6  # per job: decision, start, finish


# -- read_chunk ---------------------------------------------------------------------------------


def test_read_chunk_sends_whole_lines_while_running_and_the_rest_when_final(tmp_path: Path) -> None:
    f = tmp_path / "log"
    assert read_chunk(f, 0, final=False) == b""  # not created yet
    f.write_bytes(b"one\ntwo\nthr")
    assert read_chunk(f, 0, final=False) == b"one\ntwo\n"
    assert read_chunk(f, 8, final=False) == b""
    assert read_chunk(f, 8, final=True) == b"thr"


def test_read_chunk_never_splits_a_utf8_character(tmp_path: Path) -> None:
    f = tmp_path / "log"
    f.write_bytes(b"a" * (CHUNK_BYTES - 1) + "é".encode() + b"\n")  # 'é' straddles the chunk boundary
    first = read_chunk(f, 0, final=False)
    assert len(first) == CHUNK_BYTES - 1
    first.decode("utf-8")
    assert read_chunk(f, len(first), final=False) == "é\n".encode()


def test_health_ready_and_metrics_endpoint_follow_the_agent(harness) -> None:
    h = harness(observe=("127.0.0.1", 0)).start()
    h.gw.wait_for(lambda: h.agent._observer is not None and h.status()["state"] == "running", "serving")
    base = f"http://127.0.0.1:{h.agent._observer.port}"
    h.gw.wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, "ready")
    assert httpx.get(f"{base}/healthz").json()["ok"] is True
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING report")
    text = httpx.get(f"{base}/metrics").text
    assert "edge_agent_jobs_started_total 1" in text
    assert "edge_agent_jobs_running 1" in text
    assert 'edge_agent_lease_wait_seconds_count 1' in text
    h.rt.finish("j1", 0)
    h.gw.wait_for(lambda: len(h.gw.states("j1")) == 2, "final report")
    assert 'edge_agent_jobs_finished_total{state="success"} 1' in httpx.get(f"{base}/metrics").text
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_readyz_says_draining_while_the_server_drains_the_agent(harness) -> None:
    h = harness(observe=("127.0.0.1", 0)).start()
    h.gw.wait_for(lambda: h.agent._observer is not None and h.status()["state"] == "running", "serving")
    base = f"http://127.0.0.1:{h.agent._observer.port}"
    h.gw.drain = True
    h.gw.wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 503, "not ready while drained")
    assert "drained by the server" in httpx.get(f"{base}/readyz").json()["reason"]
    assert "edge_agent_draining 1" in httpx.get(f"{base}/metrics").text
    assert httpx.get(f"{base}/healthz").status_code == 200  # drained is not unhealthy
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
