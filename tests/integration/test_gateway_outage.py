"""A gateway outage across an agent restart, against a real gateway process over real mutual TLS.

The agent registers through the real register route, then runs (real ``Agent``, loops, ``AgentAPI``
over mTLS, forwarder, spool and audit files) against a private gateway on a SQLite file. The
runtime is faked at its contract (submit -> started -> exited, writing the task log where the
supervisor would): a real task needs Airflow's task-instance rows behind the Execution API, which
this gateway's database does not have (tests/e2e runs real tasks).

Story: a job is leased; the gateway stops; the job starts, logs and ends during the outage; its
reports are spooled; the agent is stopped (the drain ends although nothing could be delivered) and
started again while the gateway is still down; the gateway comes back on the same address; the
spooled RUNNING, log and final state arrive, in that order, in the job row and the hosted log.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import select

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.client import AgentAPI
from edge_agent.config import AgentConfig
from edge_agent.identity.enroll import register
from edge_agent.identity.keystore import Keystore
from edge_agent.spool import SPOOL_DIR
from edge_agent.transport import build_client
from executor_plugin.models import JobStatus, job_table

WAIT = 180.0  # the machine is shared and a gateway start imports Airflow
_LISTENING = re.compile(r"gateway listening on https://127\.0\.0\.1:(\d+)")


class ScriptedRuntime:
    """The runtime contract, driven by the test: a job starts and exits when the test says so."""

    def __init__(self, config: AgentConfig, on_started: Callable, on_exited: Callable) -> None:
        self.log_folder = config.log_folder
        self.on_started, self.on_exited = on_started, on_exited
        self.cond = threading.Condition()
        self.submitted: dict[str, dict] = {}
        self.cancels: list[tuple[str, str]] = []
        self.alive = False

    def start(self) -> None:
        self.alive = True

    def stop(self) -> None:
        self.alive = False

    def submit(self, job_id: str, workload: dict, socket_path: str) -> None:
        with self.cond:
            self.submitted[job_id] = workload
            self.cond.notify_all()

    def cancel(self, job_id: str, reason: str, grace: float | None = None) -> bool:
        self.cancels.append((job_id, reason))
        return True

    def log_file(self, job_id: str) -> Path:
        return self.log_folder / self.submitted[job_id]["log_path"]

    def begin(self, job_id: str) -> None:
        path = self.log_file(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"event": "task started"}\n')
        self.on_started(job_id, 31337, str(path))

    def write(self, job_id: str, text: str) -> None:
        with open(self.log_file(job_id), "a") as fh:
            fh.write(text)

    def end(self, job_id: str, code: int) -> None:
        self.on_exited(job_id, code, None)


class RunningAgent:
    def __init__(self, config: AgentConfig, keystore: Keystore) -> None:
        identity = keystore.load()
        self.runtime: ScriptedRuntime | None = None
        self.result: dict[str, Any] = {}

        def runtime_factory(cfg, ident, on_started, on_exited) -> ScriptedRuntime:
            self.runtime = ScriptedRuntime(cfg, on_started, on_exited)
            return self.runtime

        self.agent = Agent(config, identity, lambda: AgentAPI(build_client(identity.url, identity, 10.0)),
                           runtime_factory=runtime_factory)
        self.thread = threading.Thread(target=self._run, name="agent-under-test")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result["code"] = self.agent.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.result["error"] = exc

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait on the agent's own condition (notified on every job and spool transition)."""
        a = self.agent
        with a.cond:
            assert a.cond.wait_for(lambda: predicate() or not self.thread.is_alive(), timeout=WAIT), what
        assert self.thread.is_alive() or predicate(), f"agent stopped while waiting for {what}: {self.result}"

    def stop(self) -> dict[str, Any]:
        self.agent.stop_gracefully("test")
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "agent did not stop"
        return self.result


def relaunch(old: Any) -> Any:
    """Start the stopped gateway again on the same home and the same port (the agent's URL)."""
    code = (
        "from executor_plugin.gateway.server import serve\n"
        "from executor_plugin.settings import HostedSettings\n"
        f"serve('127.0.0.1', {old.port}, HostedSettings.from_airflow_conf())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=old.home.env, cwd=old.home.path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if _LISTENING.search(line):
                ready.set()
        ready.set()

    threading.Thread(target=pump, name="gateway-output", daemon=True).start()
    if not ready.wait(WAIT) or proc.poll() is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise AssertionError("gateway did not start again:\n" + "".join(output[-60:]))
    return type(old)(home=old.home, proc=proc, port=old.port, output=output)


def job_row(gateway: Any, job_id: str) -> dict:
    with gateway.home.session() as s:
        return dict(s.execute(select(job_table).where(job_table.c.id == job_id)).mappings().one())


def spool_records(state_dir: Path) -> dict[str, dict]:
    folder = state_dir / SPOOL_DIR
    return {f.name: json.loads(f.read_text()) for f in folder.iterdir() if f.name.endswith(".json")}


@pytest.mark.timeout(900)
def test_reports_spooled_during_an_outage_arrive_in_order_after_a_restart(start_gateway, tmp_path: Path) -> None:
    gw = start_gateway()
    state_dir = tmp_path / "agent"
    keystore = Keystore(state_dir, "file")
    queue = gw.new_queue()
    register(gw.url, str(gw.mint_token(queues=[queue])), "outage-agent", keystore, __version__, timeout=30)
    config = AgentConfig(state_dir=state_dir, concurrency=1, lease_wait=2.0, heartbeat_interval=0.5,
                         request_timeout=10.0, cancel_grace=5.0)
    log_path = "dag_id=d/run_id=r/task_id=outage/attempt=1.log"
    job_id = gw.enqueue(queue, task_id="outage", log_path=log_path)
    back = None
    first = RunningAgent(config, keystore)
    try:
        first.wait(lambda: first.agent.jobs.get(job_id) is not None, "the lease")
        rt = first.runtime
        assert rt is not None
        with rt.cond:
            assert rt.cond.wait_for(lambda: job_id in rt.submitted, timeout=WAIT), "the job reaches the runtime"
        assert job_row(gw, job_id)["state"] == JobStatus.LEASED

        assert gw.stop() == 0
        rt.begin(job_id)
        rt.write(job_id, '{"event": "working through the outage"}\n')
        rt.write(job_id, '{"event": "done"}\n')
        rt.end(job_id, 0)
        first.wait(lambda: (spool_records(state_dir).get(f"{job_id}.json") or {}).get("exited", False),
                   "the final state in the spool")
        record = spool_records(state_dir)[f"{job_id}.json"]
        assert record["running_reported"] is False and record["log_offset"] == 0 and record["exit_code"] == 0
        status = json.loads(config.status_file.read_text())
        assert status["gateway"]["reachable"] is False and status["spool"]["jobs"] == 1
        assert rt.cancels == []
        assert first.stop() == {"code": 0}  # the drain ends although nothing could be delivered

        second = RunningAgent(config, keystore)
        try:
            second.wait(lambda: second.agent.reports_blocked, "a failed replay while the gateway is down")
            assert second.agent.jobs.free_slots() == 1  # the replayed job holds no slot
            assert job_row(gw, job_id)["state"] == JobStatus.LEASED  # nothing arrived yet

            back = relaunch(gw)
            second.wait(lambda: not second.agent.jobs.records(), "the replayed job delivered")
            assert spool_records(state_dir) == {}
            assert second.stop() == {"code": 0}
        finally:
            if second.thread.is_alive():
                second.agent.abort("test cleanup")
                second.thread.join(WAIT)
    finally:
        if first.thread.is_alive():
            first.agent.abort("test cleanup")
            first.thread.join(WAIT)
        if back is not None:
            assert back.stop() == 0, back.log_text()

    row = job_row(gw, job_id)
    assert row["state"] == JobStatus.SUCCESS and row["exit_code"] == 0 and row["reason"] is None
    assert row["started_at"] is not None and row["started_at"] < row["finished_at"]  # RUNNING came first
    # The gateway's access log, in arrival order: RUNNING, the log chunk(s), the final state.
    calls = [m.group(1) for line in back.output
             if (m := re.search(rf'"POST /agents/v1/jobs/{job_id}/(state|logs) HTTP', line))]
    assert calls[0] == "state" and calls[-1] == "state" and "logs" in calls[1:-1], calls
    hosted = (gw.home.log_folder / log_path).read_bytes()
    assert hosted == (config.log_folder / log_path).read_bytes()
    assert hosted.decode().splitlines() == ['{"event": "task started"}', '{"event": "working through the outage"}',
                                            '{"event": "done"}']
    audit = [json.loads(line) for line in (state_dir / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in audit if e.get("job_id") == job_id] == ["decision", "start", "finish"]
    assert next(e for e in audit if e["event"] == "start")["pid"] == 31337
