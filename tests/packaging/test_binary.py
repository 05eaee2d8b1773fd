"""The standalone binary (PyInstaller onedir) against a real gateway: version, register, run, drain.

The frozen control process must work on its own (no Airflow inside it) and start the task runtime
with the Python named by --runtime-python: here this venv's, which has the Task SDK.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from pkg_helpers import Lines, clean_env
from sqlalchemy import select

from edge_agent import __version__
from executor_plugin.models import metadata


def run(binary: Path, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env=clean_env(**env))


def test_version(onedir_binary: Path) -> None:
    result = run(onedir_binary, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edge-agent {__version__}"


def test_bundle_holds_no_airflow(onedir_binary: Path) -> None:
    internal = onedir_binary.parent / "_internal"
    names = {p.name.split(".")[0].split("-")[0].lower() for p in internal.iterdir()}
    assert not names & {"airflow", "sqlalchemy", "fastapi", "starlette", "uvicorn", "executor_plugin"}, names


def test_register_and_run_a_job_with_the_frozen_binary(onedir_binary, gateway, tmp_path, agent_processes) -> None:
    queue_name = gateway.new_queue()
    token = gateway.mint_token(queues=[queue_name], name="frozen")
    state = tmp_path / "state"
    reg = run(onedir_binary, "register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(state),
              stdin=str(token))
    assert reg.returncode == 0, reg.stderr
    assert queue_name in reg.stdout and token.secret not in reg.stdout + reg.stderr
    status = run(onedir_binary, "status", "--state-dir", str(state), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["gateway"]["accepted"] is True

    # A job for a DAG file this agent does not have: the whole path (lease, runtime zygote in the
    # runtime Python, report) runs, without needing a scheduler behind the gateway.
    dags = tmp_path / "dags"
    dags.mkdir()
    job_id = gateway.enqueue(queue_name)
    proc = subprocess.Popen(
        [str(onedir_binary), "run", "--state-dir", str(state), "--runtime-python", sys.executable,
         "--dags-folder", str(dags), "--concurrency", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )
    agent_processes.append(proc)
    out = Lines(proc)
    out.wait_for(r"runtime ready: pid \d+, task SDK")
    out.wait_for(rf"job {job_id} exited with \d+ \(.*\)")
    proc.send_signal(signal.SIGTERM)
    out.wait_for(r"agent stopped")
    assert proc.wait(60) == 0, "".join(out.lines)

    jobs = metadata.tables["edge_agent_job"]
    with gateway.home.session() as s:
        row = s.execute(select(jobs.c.state, jobs.c.reason).where(jobs.c.id == job_id)).one()
    assert row.state == "failed" and row.reason, row


def test_frozen_run_without_runtime_python_says_what_to_do(onedir_binary, tmp_path) -> None:
    # sys.executable is the binary itself when frozen: it cannot run 'python -m edge_agent.runtime.zygote'.
    result = run(onedir_binary, "run", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert "--runtime-python" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
