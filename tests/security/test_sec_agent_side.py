"""Agent-side defences, with the real ``edge-agent`` binary against the real gateway: the local
policy refuses a job the hosted side offers (it never runs, and is not offered again), and the
local audit log shows any edit or removal (``edge-agent audit verify``).

One agent serves the module: it registers, starts with a policy that only allows DAGs named
``allowed_*``, is offered three jobs of ``forbidden_*`` DAGs (real Airflow task instances), refuses
them all, and is stopped with SIGTERM. The tests then read what it left behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from secsupport import (
    BIN,
    TaskInstanceRef,
    add_queued_task_instance,
    client_with,
    edge_agent_cli,
    enqueue_for,
    job_row,
    lease,
    mint_token,
    task_instance_row,
)
from sqlalchemy import select

from executor_plugin.models import JobStatus, job_refusal_table

REFUSAL_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


@dataclass
class RefusingAgent:
    state_dir: Path
    log_file: Path
    agent_id: str
    tis: list[TaskInstanceRef]
    jobs: list[str]
    ti_rows_before: list[dict[str, Any]]
    exit_code: int

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")[-5000:]


def _wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            tail = log_file.read_text()[-5000:]
            raise AssertionError(f"edge-agent run exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)  # another process's database writes: nothing to wait on but the rows
    raise AssertionError(f"timed out waiting for {what}:\n{log_file.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def refusing_agent(gateway, tmp_path_factory) -> Iterator[RefusingAgent]:
    home = tmp_path_factory.mktemp("agent-side")
    state = home / "state"
    queue = gateway.new_queue()
    token = mint_token(gateway, queues=[queue])
    registered = edge_agent_cli(
        "register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(state), "--name", "sec-policy",
        stdin=str(token),
    )
    assert registered.returncode == 0, registered.stderr
    agent_id = json.loads((state / "identity.json").read_text())["agent_id"]
    policy = home / "policy.toml"
    policy.write_text('allowed_dags = ["allowed_*"]\n')
    tis = [add_queued_task_instance(gateway, queue=queue, dag_prefix="forbidden") for _ in range(3)]
    jobs = [enqueue_for(gateway, ti, queue) for ti in tis]
    ti_rows_before = [task_instance_row(gateway, ti.id) for ti in tis]
    log_file = home / "agent.log"
    env = {k: v for k, v in gateway.home.env.items() if not k.startswith(("AIRFLOW", "EDGE_AGENT"))}
    env.update(EDGE_AGENT_SECRET_BACKEND="file", PYTHONUNBUFFERED="1")
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--state-dir", str(state), "--policy", str(policy), "--concurrency", "1",
             "--dags-folder", str(home)],
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(
            "every job to be refused",
            lambda: all(job_row(gateway, j)["state"] not in (JobStatus.QUEUED, JobStatus.LEASED) for j in jobs),
            REFUSAL_TIMEOUT, proc, log_file,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    yield RefusingAgent(state, log_file, agent_id, tis, jobs, ti_rows_before, proc.returncode)


def test_local_policy_refusal_never_runs_the_task(gateway, refusing_agent):
    agent = refusing_agent
    assert agent.exit_code == 0, agent.log_text()
    for job_id, ti, ti_before in zip(agent.jobs, agent.tis, agent.ti_rows_before, strict=True):
        row = job_row(gateway, job_id)
        # No other agent may serve the queue: the try fails with the agent's reason.
        assert row["state"] == JobStatus.FAILED, row
        assert "refused by agent" in row["reason"] and "allowed_dags" in row["reason"], row["reason"]
        assert row["started_at"] is None and row["exit_code"] is None
        # Airflow never heard from a task: the task instance row did not move (no /run, no heartbeat).
        assert task_instance_row(gateway, ti.id) == ti_before
    # Nothing reached the runtime: no task log on the agent, and the runtime's own log never
    # names the jobs.
    logs = agent.state_dir / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    assert [p.name for p in files if p.name != "runtime.log"] == []
    runtime_log = "".join(p.read_text(errors="replace") for p in files)
    assert not any(job_id in runtime_log for job_id in agent.jobs)
    assert not any(ti.dag_id in runtime_log for ti in agent.tis)
    with gateway.home.session() as s:
        refusals = s.execute(select(job_refusal_table).where(job_refusal_table.c.job_id.in_(agent.jobs))).all()
    assert {r.agent_id for r in refusals} == {agent.agent_id} and len(refusals) == len(agent.jobs)


def test_refused_task_is_not_offered_to_the_agent_again(gateway, refusing_agent):
    # A new try of the refused task instance (same dag/task/run/map index) must skip this agent.
    agent = refusing_agent
    ti = agent.tis[0]
    job_id = enqueue_for(gateway, ti, job_row(gateway, agent.jobs[0])["queue"])
    before = job_row(gateway, job_id)
    # The agent's own key and certificate, from its state dir.
    with client_with(gateway, agent.state_dir / "agent.pem", agent.state_dir / "agent.key") as c:
        assert lease(gateway, None, wait_seconds=1, client=c) is None
    assert job_row(gateway, job_id) == before


def _entries(state_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state_dir / "audit.log").read_text().splitlines()]


def _verify(state_dir: Path) -> tuple[int, dict[str, Any]]:
    result = edge_agent_cli("audit", "verify", "--state-dir", str(state_dir), "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_audit_log_records_every_refusal_and_verifies(refusing_agent):
    entries = _entries(refusing_agent.state_dir)
    refused = [e for e in entries if e.get("decision") == "refused"]
    assert {e["job_id"] for e in refused} == set(refusing_agent.jobs)
    code, report = _verify(refusing_agent.state_dir)
    assert code == 0, report


def _tampered_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    log = dst / "audit.log"
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    body = change(lines[:-1])
    log.write_bytes(b"\n".join(body) + b"\n")
    return dst


def _flip_decision(lines: list[bytes]) -> list[bytes]:
    i = next(n for n, line in enumerate(lines) if b'"refused"' in line)
    lines[i] = lines[i].replace(b'"refused"', b'"accepted"', 1)
    return lines


def _drop_first_refusal(lines: list[bytes]) -> list[bytes]:
    i = next(n for n, line in enumerate(lines) if b'"refused"' in line)
    return lines[:i] + lines[i + 1 :]


@pytest.mark.parametrize(
    ("name", "change", "kind"),
    [
        pytest.param("edited", _flip_decision, "edited", id="edited"),
        pytest.param("removed", _drop_first_refusal, "removed", id="removed"),
        pytest.param("cut_from_end", lambda lines: lines[:-1], "truncated", id="cut_from_end"),
        pytest.param(
            "swapped", lambda lines: [*lines[:-2], lines[-1], lines[-2]], "reordered", id="swapped"
        ),
    ],
)
def test_audit_verify_detects_tampering(refusing_agent, tmp_path, name, change, kind):
    assert len(_entries(refusing_agent.state_dir)) >= 3, "too few audit entries to tamper with"
    copy = _tampered_copy(refusing_agent.state_dir, tmp_path / name, change)
    code, report = _verify(copy)
    assert code == 1, report
    assert kind in {p["kind"] for p in report["problems"]}, report
    assert report["first_bad_line"] >= 1
