"""The runtime zygote with the real Task SDK, behind the real forwarder, against a fake Execution API.

The fake API is the forwarder's ``send`` callable answering in-process: the supervisor's real
``airflow.sdk.api.client.Client`` speaks HTTP over the forwarder's Unix socket, exactly as in
production; only the gateway behind ``send`` is replaced. The full path through a real gateway
and Airflow is covered by tests/e2e.
"""

from __future__ import annotations

import json
import os
import shutil
import select
import signal
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.forwarder import Forwarder
from edge_agent.runtime import (
    EXIT_DUPLICATE,
    EXIT_NOT_STARTED,
    EXIT_RUNTIME_LOST,
    EXIT_SUPERVISOR_ERROR,
    Runtime,
    RuntimeSettings,
    RuntimeStartError,
    _process_children,
    kill_tree,
)

WAIT = 90.0  # generous: the machine is shared and imports alone take seconds

DAGS = {
    "touch.py": """
        import pendulum
        from airflow.sdk import dag, task

        @dag(dag_id="rt_touch", schedule=None, start_date=pendulum.datetime(2024, 1, 1))
        def rt_touch():
            @task
            def touch():
                import os
                with open({marker!r}, "w") as f:
                    f.write(str(os.getpid()))
            touch()

        rt_touch()
    """,
    "sleepy.py": """
        import time
        import pendulum
        from airflow.sdk import dag, task

        @dag(dag_id="rt_sleepy", schedule=None, start_date=pendulum.datetime(2024, 1, 1))
        def rt_sleepy():
            @task
            def nap():
                time.sleep(600)
            nap()

        rt_sleepy()
    """,
}


def _run_context() -> dict[str, Any]:
    """A minimal valid ``TIRunContext`` (airflow/sdk/api/datamodels/_generated.py)."""
    return {
        "dag_run": {
            "dag_id": "rt_dag",
            "run_id": "manual__1",
            "logical_date": None,
            "data_interval_start": None,
            "data_interval_end": None,
            "run_after": "2024-01-01T00:00:00Z",
            "start_date": "2024-01-01T00:00:00Z",
            "end_date": None,
            "run_type": "manual",
            "state": "running",
            "consumed_asset_events": [],
            "partition_key": None,
        },
        "max_tries": 0,
    }


class FakeExecutionAPI:
    """Answers the calls a supervisor makes for a simple task; records them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        #: ti id -> (status, json body) to answer PATCH /run with instead of a run context.
        self.run_replies: dict[str, tuple[int, dict[str, Any]]] = {}
        self.lock = threading.Condition()

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes):
        with self.lock:
            self.calls.append((method, path, headers))
            self.lock.notify_all()
        parts = path.split("?")[0].strip("/").split("/")  # execution, task-instances, <id>, <action>
        json_type = {"content-type": "application/json"}
        if parts[1:2] == ["task-instances"] and parts[-1] == "run":
            if parts[2] in self.run_replies:
                status, reply = self.run_replies[parts[2]]
                return status, json_type, json.dumps(reply).encode()
            return 200, {**json_type, "refreshed-api-token": "execution-token"}, json.dumps(_run_context()).encode()
        if method in ("PUT", "PATCH") and parts[-1] in ("heartbeat", "state"):
            return 204, {}, b""
        return 200, json_type, b"{}"

    def wait_for_run_call(self, ti_id: str) -> None:
        """The supervisor calls PATCH /run right after forking the task process."""
        with self.lock:
            assert self.lock.wait_for(lambda: "PATCH run" in self._paths(ti_id), WAIT), "no /run call"

    def paths_for(self, ti_id: str) -> list[str]:
        with self.lock:
            return self._paths(ti_id)

    def _paths(self, ti_id: str) -> list[str]:
        return [f"{m} {p.rsplit('/', 1)[-1]}" for m, p, _ in self.calls if ti_id in p]


class Events:
    """Records runtime callbacks; lets a test wait for one job's exit."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[int, str | None]] = {}
        self.exited: dict[str, tuple[int, str | None]] = {}
        self.exit_counts: dict[str, int] = {}
        self.cond = threading.Condition()

    def on_started(self, job_id: str, pid: int, log_file: str | None) -> None:
        with self.cond:
            self.started[job_id] = (pid, log_file)
            self.cond.notify_all()

    def on_exited(self, job_id: str, exit_code: int, reason: str | None) -> None:
        with self.cond:
            self.exited[job_id] = (exit_code, reason)
            self.exit_counts[job_id] = self.exit_counts.get(job_id, 0) + 1
            self.cond.notify_all()

    def wait_started(self, job_id: str) -> tuple[int, str | None]:
        with self.cond:
            assert self.cond.wait_for(lambda: job_id in self.started, WAIT), f"{job_id} never started"
            return self.started[job_id]

    def wait_exited(self, job_id: str) -> tuple[int, str | None]:
        with self.cond:
            assert self.cond.wait_for(lambda: job_id in self.exited, WAIT), f"{job_id} never exited"
            return self.exited[job_id]


def workload(dag_id: str, task_id: str, rel_path: str, *, bundle: str = "dags-folder") -> dict[str, Any]:
    """An ``ExecuteTask`` as the gateway sends it (``model_dump(mode="json")``)."""
    ti_id = str(uuid.uuid4())
    return {
        "token": "workload-token-secret",
        "ti": {
            "id": ti_id,
            "task_id": task_id,
            "dag_id": dag_id,
            "run_id": "manual__1",
            "try_number": 1,
            "dag_version_id": str(uuid.uuid4()),
            "map_index": -1,
            "hostname": None,
            "context_carrier": None,
            "queue": "default",
            "pool_slots": 1,
            "priority_weight": 1,
        },
        "dag_rel_path": rel_path,
        "bundle_info": {"name": bundle, "version": None},
        "log_path": f"dag_id={dag_id}/run_id=manual__1/task_id={task_id}/attempt=1-{ti_id}.log",
        "sentry_integration": "",
        "type": "ExecuteTask",
    }


def gone(pid: int, timeout: float = WAIT) -> bool:
    """Wait until ``pid`` has exited (a pidfd becomes readable then), at most ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Short path: AF_UNIX socket paths are limited to ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (base / "dags").mkdir()
    for name, text in DAGS.items():
        (base / "dags" / name).write_text(textwrap.dedent(text).format(marker=str(base / "marker")))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def settings_for(base: Path, **overrides: Any) -> RuntimeSettings:
    values = dict(
        python=sys.executable,
        airflow_home=base / "airflow",
        dags_folder=base / "dags",
        log_folder=base / "logs",
        # Not importable anywhere: the worker only compares the string (no task sets executor=).
        executor="edge_tests.NotImportableExecutor",
    )
    values.update(overrides)
    return RuntimeSettings(**values)


@pytest.fixture(scope="module")
def api() -> FakeExecutionAPI:
    return FakeExecutionAPI()


@pytest.fixture(scope="module")
def forwarder(workdir: Path, api: FakeExecutionAPI) -> Iterator[Forwarder]:
    with Forwarder(workdir / "run" / "fwd.sock", api.send) as fwd:
        yield fwd


@pytest.fixture(scope="module")
def events() -> Events:
    return Events()


@pytest.fixture(scope="module")
def runtime(workdir: Path, events: Events) -> Iterator[Runtime]:
    rt = Runtime(settings_for(workdir), events.on_started, events.on_exited)
    rt.start()
    print(f"\nzygote ready after {rt.ready_seconds:.2f} s (task SDK {rt.sdk_version})")
    yield rt
    rt.stop()
    assert rt._proc is not None and rt._proc.returncode == 0


def test_missing_dag_file_fails_fast_with_reason(runtime: Runtime, events: Events, forwarder: Forwarder, api) -> None:
    wl = workload("rt_touch", "touch", "not_here.py")
    runtime.submit("missing-file", wl, str(forwarder.socket_path))
    code, reason = events.wait_exited("missing-file")
    assert code == EXIT_NOT_STARTED
    assert reason == (
        f"bundle 'dags-folder' has no file 'not_here.py' on this agent (looked in {runtime.settings.dags_folder})"
    )
    assert "missing-file" not in events.started
    assert api.paths_for(wl["ti"]["id"]) == []  # never reached the Execution API


def test_unknown_bundle_fails_fast_with_reason(runtime: Runtime, events: Events, forwarder: Forwarder) -> None:
    runtime.submit("no-bundle", workload("rt_touch", "touch", "touch.py", bundle="git-repo"), str(forwarder.socket_path))
    code, reason = events.wait_exited("no-bundle")
    assert code == EXIT_NOT_STARTED
    assert reason is not None and reason.startswith("bundle 'git-repo' is not configured on this agent (configured: dags-folder)")


def test_path_escaping_the_bundle_is_refused(runtime: Runtime, events: Events, forwarder: Forwarder) -> None:
    runtime.submit("escape", workload("rt_touch", "touch", "../../etc/passwd"), str(forwarder.socket_path))
    code, reason = events.wait_exited("escape")
    assert code == EXIT_NOT_STARTED and "not a relative path inside bundle" in (reason or "")


def test_invalid_workload_reason_does_not_leak_the_token(runtime: Runtime, events: Events, forwarder: Forwarder) -> None:
    wl = workload("rt_touch", "touch", "touch.py")
    del wl["ti"]["dag_version_id"]
    wl["ti"]["try_number"] = "workload-token-secret"
    runtime.submit("invalid", wl, str(forwarder.socket_path))
    code, reason = events.wait_exited("invalid")
    assert code == EXIT_NOT_STARTED
    assert reason is not None and reason.startswith("invalid ExecuteTask workload: ") and "dag_version_id" in reason
    assert "workload-token-secret" not in reason


def test_task_runs_through_the_forwarder(
    runtime: Runtime, events: Events, forwarder: Forwarder, api: FakeExecutionAPI, workdir: Path
) -> None:
    marker = workdir / "marker"
    marker.unlink(missing_ok=True)
    wl = workload("rt_touch", "touch", "touch.py")
    runtime.submit("happy", wl, str(forwarder.socket_path))
    pid, log_file = events.wait_started("happy")
    code, reason = events.wait_exited("happy")

    assert (code, reason) == (0, None)
    assert int(marker.read_text()) not in (os.getpid(), runtime.pid, pid)  # ran in the task process
    assert log_file == str(workdir / "logs" / wl["log_path"])
    log_lines = [json.loads(line) for line in Path(log_file).read_text().splitlines()]
    assert any("Filling up the DagBag" in line.get("event", "") for line in log_lines)
    calls = api.paths_for(wl["ti"]["id"])
    assert calls[0] == "PATCH run" and calls[-1] == "PATCH state"
    # The workload token went out on /run; the refreshed token was used afterwards.
    auth = {p.rsplit("/", 1)[-1]: h.get("authorization") for m, p, h in api.calls if wl["ti"]["id"] in p}
    assert auth["run"] == "Bearer workload-token-secret" and auth["state"] == "Bearer execution-token"


def test_duplicate_delivery_is_distinct_from_failure(
    runtime: Runtime, events: Events, forwarder: Forwarder, api: FakeExecutionAPI
) -> None:
    wl = workload("rt_touch", "touch", "touch.py")
    api.run_replies[wl["ti"]["id"]] = (
        409,
        {"detail": {"reason": "invalid_state", "message": "TI was not in a state where it could be marked as running", "previous_state": "running"}},
    )
    runtime.submit("dup", wl, str(forwarder.socket_path))
    code, reason = events.wait_exited("dup")
    assert code == EXIT_DUPLICATE
    assert "already running (duplicate delivery)" in (reason or "")


def test_refused_run_reports_supervisor_error(
    runtime: Runtime, events: Events, forwarder: Forwarder, api: FakeExecutionAPI
) -> None:
    wl = workload("rt_touch", "touch", "touch.py")
    api.run_replies[wl["ti"]["id"]] = (403, {"detail": "Invalid token"})
    runtime.submit("refused", wl, str(forwarder.socket_path))
    code, reason = events.wait_exited("refused")
    assert code == EXIT_SUPERVISOR_ERROR
    assert (reason or "").startswith("task supervisor failed before the task could finish: ServerResponseError")


def test_cancel_terminates_the_whole_job(
    runtime: Runtime, events: Events, forwarder: Forwarder, api: FakeExecutionAPI
) -> None:
    wl = workload("rt_sleepy", "nap", "sleepy.py")
    runtime.submit("cancel-me", wl, str(forwarder.socket_path))
    pid, _ = events.wait_started("cancel-me")
    task_pids = _task_processes(api, wl, pid)
    assert runtime.cancel("cancel-me", "lost lease")
    code, reason = events.wait_exited("cancel-me")
    assert reason is not None and reason.startswith("cancelled: lost lease")
    assert all(gone(p) for p in [pid, *task_pids])
    assert runtime.cancel("cancel-me", "again") is False


def _task_processes(api: FakeExecutionAPI, wl: dict[str, Any], supervisor_pid: int) -> list[int]:
    """The task process(es) the supervisor forked; it calls /run only after forking."""
    api.wait_for_run_call(wl["ti"]["id"])
    found = _process_children().get(supervisor_pid, [])
    assert found, "the supervisor has no task process"
    return found


def test_supervisor_killed_from_outside_is_explained(
    runtime: Runtime, events: Events, forwarder: Forwarder, api: FakeExecutionAPI
) -> None:
    wl = workload("rt_sleepy", "nap", "sleepy.py")
    runtime.submit("oom", wl, str(forwarder.socket_path))
    pid, _ = events.wait_started("oom")
    task_pids = _task_processes(api, wl, pid)
    kill_tree(pid, signal.SIGKILL)  # what the OOM killer would do to the whole job
    code, reason = events.wait_exited("oom")
    assert code == 128 + signal.SIGKILL
    assert reason == "the job's supervisor process was killed by SIGKILL"
    assert all(gone(p) for p in task_pids)


def test_stop_cancels_running_jobs_and_reports_them(workdir: Path, forwarder: Forwarder, api: FakeExecutionAPI) -> None:
    ev = Events()
    rt = Runtime(settings_for(workdir, log_folder=workdir / "logs-stop"), ev.on_started, ev.on_exited)
    rt.start()
    try:
        wl = workload("rt_sleepy", "nap", "sleepy.py")
        rt.submit("running-at-stop", wl, str(forwarder.socket_path))
        pid, _ = ev.wait_started("running-at-stop")
        task_pids = _task_processes(api, wl, pid)
    finally:
        rt.stop()
    code, reason = ev.exited["running-at-stop"]
    assert reason is not None and reason.startswith("cancelled: the agent is stopping")
    assert ev.exit_counts["running-at-stop"] == 1
    assert all(gone(p) for p in [pid, *task_pids])
    assert rt._proc is not None and rt._proc.returncode == 0
    rt.stop()  # idempotent


def test_zygote_death_reports_and_kills_its_jobs(workdir: Path, forwarder: Forwarder, api: FakeExecutionAPI) -> None:
    ev = Events()
    rt = Runtime(settings_for(workdir, log_folder=workdir / "logs-death"), ev.on_started, ev.on_exited)
    rt.start()
    try:
        wl = workload("rt_sleepy", "nap", "sleepy.py")
        rt.submit("orphan", wl, str(forwarder.socket_path))
        pid, _ = ev.wait_started("orphan")
        task_pids = _task_processes(api, wl, pid)
        assert rt.pid is not None
        os.kill(rt.pid, signal.SIGKILL)
        code, reason = ev.wait_exited("orphan")
        assert code == EXIT_RUNTIME_LOST
        assert "runtime zygote exited with code -9" in (reason or "")
        assert not rt.alive
        with pytest.raises(Exception, match="not running"):
            rt.submit("late", workload("rt_touch", "touch", "touch.py"), str(forwarder.socket_path))
        for p in [pid, *task_pids]:
            assert gone(p), f"process {p} survived its zygote"
    finally:
        rt.stop()


def test_start_failure_carries_stderr_tail(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named airflow_nothing' >&2\nexit 3\n")
    broken.chmod(0o755)
    rt = Runtime(settings_for(tmp_path, python=str(broken), dags_folder=None), print, print)
    with pytest.raises(RuntimeStartError, match="exited with code 3.*No module named airflow_nothing"):
        rt.start()
    assert (tmp_path / "logs" / "runtime.log").exists()


def test_zygote_environment(tmp_path: Path) -> None:
    from edge_agent.runtime.env import NO_DATABASE_URL, build_env

    settings = settings_for(tmp_path)
    base = {
        "PATH": "/usr/bin",
        "EDGE_AGENT_TOKEN": "eat1_secret",
        "EDGE_AGENT_STATE_DIR": "/var/lib/edge-agent",
        "CREDENTIALS_DIRECTORY": "/run/credentials/edge-agent.service",
        "AIRFLOW__CORE__EXECUTOR": "OperatorChoice",  # the operator's override wins
    }
    env = build_env(settings, base)
    assert env["PATH"] == "/usr/bin"
    assert not {"EDGE_AGENT_TOKEN", "EDGE_AGENT_STATE_DIR", "CREDENTIALS_DIRECTORY"} & env.keys()
    assert env["AIRFLOW_HOME"] == str(tmp_path / "airflow") and (tmp_path / "airflow").is_dir()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "OperatorChoice"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(tmp_path / "dags")
    assert env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] == str(tmp_path / "logs")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == NO_DATABASE_URL
    assert env["AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL"] == "1"
    assert float(env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"]) > 5
    assert build_env(settings_for(tmp_path, dags_folder=None), {})["AIRFLOW__CORE__EXECUTOR"] == settings.executor
    assert "AIRFLOW__CORE__DAGS_FOLDER" not in build_env(settings_for(tmp_path, dags_folder=None), {})
