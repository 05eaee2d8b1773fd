"""The runtime zygote: imports the Task SDK once, then forks one supervisor per job.

Started by :class:`edge_agent.runtime.Runtime` as ``<runtime python> -m edge_agent.runtime.zygote``;
speaks JSON lines on stdin/stdout (docs/architecture.md, "Runtime contract"). Before forking it
checks that the job's bundle is configured here and that the DAG file exists, because the Task
SDK's own answer to a missing DAG is to reschedule the task for minutes.

Single-threaded on purpose: ``fork()`` from a threaded process can hand the child locks held by
threads that do not exist there. One selector waits on stdin, on the signal wakeup pipe (SIGCHLD,
SIGTERM) and on the next SIGKILL deadline of a cancelled job.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from edge_agent.runtime import (
    CANCEL_GRACE_SECONDS,
    EXIT_NOT_STARTED,
    EXIT_SUPERVISOR_ERROR,
    exit_code_from_status,
    kill_tree,
)

_MAX_LINE_BYTES = 64 * 1024 * 1024


def _claim_protocol_fds() -> tuple[int, int]:
    """Move the protocol pipe off fds 0/1 before anything can print to stdout.

    Airflow logs to stdout during import (``DAG bundles loaded: ...``) and the supervisor's structlog
    does too; on fd 1 that text would corrupt the JSON lines. Afterwards fd 1 is a copy of stderr
    (runtime.log) and fd 0 is /dev/null, which forked jobs inherit.
    """
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return proto_in, proto_out


@dataclass
class _Sdk:
    """What the zygote imported once; forked jobs share these pages copy-on-write."""

    execute_task: Any
    validation_error: type[Exception]
    bundles: Any
    base_log_folder: Path
    version: str


#: Modules a job imports at first use that importing the SDK does not load. Measured with
#: ``PYTHONPROFILEIMPORTTIME`` on a trivial ``@task`` (tests/integration/test_runtime_warm.py keeps
#: it so): before they were imported here, every job spent about 300 ms importing, mostly in the task
#: process, 140 ms of it ``packaging`` compiling its regular expressions. Each is optional: a runtime
#: without one still works, its jobs import it themselves.
_FIRST_USE_MODULES = (
    "airflow.sdk.definitions.connection",  # supervisor: connection lookups
    "airflow.sdk._shared.logging.factory",  # supervisor: the task log's handlers
    "airflow.sdk.definitions.asset.metadata",  # task process: after every task
    "jinja2.ext",  # task process: templated fields
    "encodings.idna",  # the first HTTP request's host name
    "packaging.requirements",  # @task and the Python operators (providers.standard)
)


def _warm_up() -> list[str]:
    """Import, once, what jobs would each import; returns the modules of the list that failed (for the log).

    A DAG file's ``from airflow.sdk import dag, task`` resolves lazy attributes of ``airflow.sdk``;
    resolving all of them here costs about 2 MB in the zygote, shared by every job.
    """
    import importlib

    import airflow.sdk

    for name in getattr(airflow.sdk, "__all__", ()):
        try:
            getattr(airflow.sdk, name)
        except Exception:  # a broken optional part (3.3.2's "lineage" is one) must not stop the runtime
            continue
    missing = []
    for module in _FIRST_USE_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__})")
    return missing


def _import_sdk() -> _Sdk:
    import airflow.sdk
    import airflow.sdk.execution_time.supervisor  # noqa: F401  (the heavy import, done once)
    import airflow.sdk.execution_time.task_runner  # noqa: F401  (runs in every task process)
    import httpx  # noqa: F401
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag  # noqa: F401  (the task process parses with it)
    from airflow.executors.workloads import ExecuteTask
    from airflow.sdk.api.client import Client
    from airflow.sdk.configuration import conf
    from pydantic import ValidationError

    from edge_agent.runtime import child

    # Client() builds (and caches) an SSL context with certifi on first use: pay it once here.
    child.prepare()
    Client(base_url=child.EXECUTION_BASE_URL, token="", transport=child.forwarder_transport(os.devnull)).close()
    missing = _warm_up()
    if missing:
        print(f"edge-agent zygote: jobs will import these themselves: {', '.join(missing)}", file=sys.stderr)
    return _Sdk(
        execute_task=ExecuteTask,
        validation_error=ValidationError,
        bundles=DagBundlesManager(),
        base_log_folder=Path(conf.get("logging", "base_log_folder")),
        version=airflow.sdk.__version__,
    )


@dataclass
class _Job:
    job_id: str
    pid: int
    reason_fd: int
    cancel_reason: str | None = None
    kill_at: float | None = None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _is_inner_relative(rel: str | os.PathLike[str]) -> bool:
    """``rel`` names something below a root: relative, no ``..``, not empty."""
    rel_path = PurePath(rel)
    return not rel_path.is_absolute() and ".." not in rel_path.parts and str(rel_path) not in ("", ".")


class Zygote:
    def __init__(self, proto_in: int, proto_out: int, sdk: _Sdk) -> None:
        self.proto_in, self.proto_out = proto_in, proto_out
        self.sdk = sdk
        self.jobs: dict[str, _Job] = {}
        self.by_pid: dict[int, _Job] = {}
        self.stopping = False
        self._inbuf = b""
        self._out_broken = False

        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup byte is what matters
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        self.selector = selectors.DefaultSelector()
        self.selector.register(proto_in, selectors.EVENT_READ, "in")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    # -- protocol ----------------------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        if self._out_broken:
            return
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        try:
            while data:
                data = data[os.write(self.proto_out, data) :]
        except OSError:
            # The control process is gone; stop and take the jobs down with us.
            self._out_broken = True
            self.begin_stop("the agent's control process went away")

    def serve(self) -> int:
        self.emit({"ev": "ready", "pid": os.getpid(), "sdk_version": self.sdk.version})
        while not (self.stopping and not self.jobs):
            for key, _ in self.selector.select(self._next_timeout()):
                if key.data == "in":
                    self._read_input()
                else:
                    self._drain_wakeups()
            self._reap()
            self._escalate()
        return 0

    def _read_input(self) -> None:
        data = os.read(self.proto_in, 1 << 16)
        if not data:
            self.selector.unregister(self.proto_in)
            self.begin_stop("the agent's control process closed the pipe")
            return
        self._inbuf += data
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                self._handle_line(line)
        if len(self._inbuf) > _MAX_LINE_BYTES:
            print(f"edge-agent zygote: dropping an over-long input line ({len(self._inbuf)} bytes)", file=sys.stderr)
            self._inbuf = b""

    def _handle_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            print(f"edge-agent zygote: ignoring malformed message {line[:200]!r}", file=sys.stderr)
            return
        if op == "run":
            self.run(str(msg.get("job_id")), msg.get("workload"), str(msg.get("socket")))
        elif op == "cancel":
            self.cancel(str(msg.get("job_id")), str(msg.get("reason") or "cancelled by the agent"),
                        _grace(msg.get("grace")))
        elif op == "stop":
            self.begin_stop("the agent is stopping")
        else:
            print(f"edge-agent zygote: ignoring unknown op {op!r}", file=sys.stderr)

    # -- jobs --------------------------------------------------------------------------------

    def run(self, job_id: str, raw_workload: Any, socket_path: str) -> None:
        if job_id in self.jobs:
            print(f"edge-agent zygote: job {job_id} is already running; ignoring a second run", file=sys.stderr)
            return
        if self.stopping:
            self._not_started(job_id, "the task runtime is stopping")
            return
        try:
            workload = self.sdk.execute_task.model_validate(raw_workload)
        except self.sdk.validation_error as exc:
            # include_input=False: the input holds the task token.
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'workload'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)[:5]
            )
            self._not_started(job_id, f"invalid ExecuteTask workload: {problems}")
            return
        problem = self.precheck(workload)
        if problem:
            self._not_started(job_id, problem)
            return

        reason_r, reason_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the job's process; never returns
            code = EXIT_SUPERVISOR_ERROR
            try:
                from edge_agent.runtime import child

                os.close(reason_r)
                code = child.run(
                    workload, socket_path=socket_path, reason_fd=reason_w, close_fds=self._private_fds()
                )
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(reason_w)
        os.set_blocking(reason_r, False)
        try:
            os.setpgid(pid, pid)  # also done by the child; whichever runs first, cancel finds the group
        except OSError:
            pass
        job = _Job(job_id=job_id, pid=pid, reason_fd=reason_r)
        self.jobs[job_id] = job
        self.by_pid[pid] = job
        log_file = str(self.sdk.base_log_folder / workload.log_path) if workload.log_path else None
        self.emit({"ev": "started", "job_id": job_id, "pid": pid, "log_file": log_file})

    def precheck(self, workload: Any) -> str | None:
        """Why this job cannot start on this agent, or None. Checks only what needs no network."""
        name = workload.bundle_info.name
        try:
            bundle = self.sdk.bundles.get_bundle(name=name, version=workload.bundle_info.version)
        except ValueError:
            configured = ", ".join(self.sdk.bundles.get_all_bundle_names()) or "none"
            return (
                f"bundle {name!r} is not configured on this agent (configured: {configured}); "
                "map it in [dag_processor] dag_bundle_config_list of the agent's runtime"
            )
        except Exception as exc:
            return f"bundle {name!r} cannot be loaded on this agent: {type(exc).__name__}: {exc}"
        rel = workload.dag_rel_path
        if not _is_inner_relative(rel):
            return f"DAG path {str(rel)!r} is not a relative path inside bundle {name!r}"
        if workload.log_path and not _is_inner_relative(workload.log_path):
            return f"log path {workload.log_path!r} is not a relative path inside the log folder"
        if bundle.supports_versioning:
            # A versioned bundle (git, ...) checks its version out in the task process; its files
            # do not exist before that.
            return None
        root = Path(bundle.path)
        if not (root / rel).is_file():
            return f"bundle {name!r} has no file {str(rel)!r} on this agent (looked in {root})"
        return None

    def cancel(self, job_id: str, reason: str, grace: float = CANCEL_GRACE_SECONDS) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.cancel_reason is not None:
            return
        job.cancel_reason = f"cancelled: {reason}"
        job.kill_at = time.monotonic() + grace
        # The supervisor forwards SIGTERM to the task process, whose on_kill() runs, then reports.
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def begin_stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            print(f"edge-agent zygote: stopping: {why}", file=sys.stderr)
        for job_id in list(self.jobs):
            self.cancel(job_id, why)

    def _not_started(self, job_id: str, reason: str) -> None:
        self.emit({"ev": "exited", "job_id": job_id, "exit_code": EXIT_NOT_STARTED, "reason": reason})

    # -- processes ---------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self.begin_stop(f"received {_signal_name(signum)}")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.by_pid.pop(pid, None)
            if job is None:
                continue
            del self.jobs[job.job_id]
            child_reason = self._read_reason(job.reason_fd)
            if child_reason is None and job.cancel_reason is None and os.WIFSIGNALED(status):
                # Nobody here sent it: the OOM killer, an operator, a crash. Say so in the report.
                child_reason = f"the job's supervisor process was killed by {_signal_name(os.WTERMSIG(status))}"
            reasons = [r for r in (job.cancel_reason, child_reason) if r]
            self.emit(
                {
                    "ev": "exited",
                    "job_id": job.job_id,
                    "exit_code": exit_code_from_status(status),
                    "reason": "; ".join(reasons) or None,
                }
            )

    @staticmethod
    def _read_reason(fd: int) -> str | None:
        data = b""
        try:
            while chunk := os.read(fd, 4096):
                data += chunk
        except BlockingIOError:
            pass  # the task process may still hold the write end; what was written is here
        finally:
            os.close(fd)
        return data.decode(errors="replace").strip() or None

    def _escalate(self) -> None:
        now = time.monotonic()
        for job in self.jobs.values():
            if job.kill_at is not None and job.kill_at <= now:
                job.kill_at = None
                kill_tree(job.pid, signal.SIGKILL)

    def _next_timeout(self) -> float | None:
        deadlines = [job.kill_at for job in self.jobs.values() if job.kill_at is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _private_fds(self) -> list[int]:
        fds = [self.proto_in, self.proto_out, self.wake_r, self.wake_w, self.selector.fileno()]
        return fds + [job.reason_fd for job in self.jobs.values()]


def _grace(value: object) -> float:
    """The cancel grace a control process sent; the default for anything that is not a sane number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 7 * 24 * 3600:
        return float(value)
    return CANCEL_GRACE_SECONDS


def main() -> int:
    proto_in, proto_out = _claim_protocol_fds()
    try:
        sdk = _import_sdk()
    except BaseException:
        print("edge-agent zygote: cannot import the Airflow Task SDK:", file=sys.stderr)
        traceback.print_exc()
        return 3
    # Move everything imported so far out of the collector's reach: a collection in a job would
    # otherwise write to (and so copy) every shared page holding an object header.
    gc.collect()
    gc.freeze()
    try:
        import setproctitle

        setproctitle.setproctitle("edge-agent runtime zygote")
    except ImportError:
        pass
    return Zygote(proto_in, proto_out, sdk).serve()


if __name__ == "__main__":
    sys.exit(main())
