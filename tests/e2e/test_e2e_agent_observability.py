"""A real agent's health, readiness and metrics endpoint, and its JSON log lines, on the e2e stack.

The agent runs with ``EDGE_AGENT_METRICS_PORT`` and ``EDGE_AGENT_LOG_FORMAT=json`` (what a systemd
unit or a container would set). A drain from the server (``airflow edge-agents drain``) must make
it not ready but still healthy, and ``resume`` ready again. Job counters on a running agent are
covered in tests/unit/test_agent.py; here the point is the real process, port and config path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import MARKER_ENV, REGION
from localstack import _BIN, LocalStack, StackError, free_port

pytestmark = pytest.mark.e2e

WAIT = 120.0


def _wait(what: str, check, agent_log: Path) -> object:
    deadline = time.monotonic() + WAIT
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(1.0)
    tail = "\n".join(agent_log.read_text(errors="replace").splitlines()[-40:])
    pytest.fail(f"timed out waiting for {what} (last: {last!r}); agent log tail:\n{tail}", pytrace=False)


def _airflow(stack: LocalStack, *args: str) -> str:
    done = subprocess.run([str(_BIN / "airflow"), "edge-agents", *args], env=stack.env, capture_output=True,
                          text=True, timeout=180, cwd=stack.home)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_health_ready_metrics_and_json_logs_of_a_real_agent(stack: LocalStack) -> None:
    port = free_port()
    name = "e2e-observed"
    try:
        agent = stack.start_agent(name, ["e2e_observed"], REGION, concurrency=3, extra_env={
            MARKER_ENV: name, "EDGE_AGENT_METRICS_PORT": str(port), "EDGE_AGENT_LOG_FORMAT": "json",
        })
    except StackError as exc:
        pytest.fail(f"agent {name} did not start:\n{exc}", pytrace=False)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait("/readyz 200", lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, agent.log_path)
        health = httpx.get(f"{base}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["ok"] is True, health.text
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "edge_agent_slots_total 3" in metrics
        assert "edge_agent_gateway_up 1" in metrics
        expiry = next(float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("edge_agent_cert_expiry_seconds "))
        assert expiry > 0

        # The live view of the same agent, as an operator would run it: redrawn until Ctrl-C.
        watch = subprocess.Popen(
            [str(_BIN / "edge-agent"), "status", "--state-dir", str(agent.state_dir), "--watch", "--interval", "1"],
            env=agent.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=stack.home,
        )
        try:
            time.sleep(3)  # a few refreshes
            watch.send_signal(signal.SIGINT)
            out, err = watch.communicate(timeout=60)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        assert watch.returncode == 0, f"status --watch exited {watch.returncode}: {err[-2000:]}"
        assert agent.agent_id in out and "3 free of 3" in out and "Ctrl-C to leave" in out, out[-3000:]

        _airflow(stack, "drain", agent.agent_id)
        reason = _wait("/readyz 503 after a server drain",
                       lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 503
                       and httpx.get(f"{base}/readyz", timeout=10).json()["reason"], agent.log_path)
        assert "drained by the server" in str(reason)
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200  # drained is not unhealthy
        assert "edge_agent_draining 1" in httpx.get(f"{base}/metrics", timeout=10).text
        _airflow(stack, "resume", agent.agent_id)
        _wait("/readyz 200 after resume", lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200,
              agent.log_path)
    finally:
        agent.stop()
    # Every line the agent logged is one JSON object naming it.
    lines = [line for line in agent.log_path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line of the agent is not JSON: {line!r}", pytrace=False)
    assert records and all(r.get("agent_id") == agent.agent_id for r in records), records[:3]
    assert any("health and metrics on" in r["message"] for r in records)
    assert any("asked this agent to drain" in r["message"] for r in records)
    assert agent.proc.returncode == 0, f"agent exited {agent.proc.returncode}"
