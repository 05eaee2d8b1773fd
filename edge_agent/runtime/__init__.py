"""Control-side handle of the task runtime: a zygote process that holds the Task SDK and forks per job.

:class:`Runtime` starts ``<runtime python> -m edge_agent.runtime.zygote`` and talks to it over
JSON lines on its stdin/stdout (docs/architecture.md, "Runtime contract")::

    control → zygote   {"op": "run", "job_id", "workload", "socket"} | {"op": "cancel", "job_id", "reason"} | {"op": "stop"}
    zygote → control   {"ev": "ready", "pid", "sdk_version"} | {"ev": "started", "job_id", "pid", "log_file"}
                       | {"ev": "exited", "job_id", "exit_code", "reason"}

Every submitted job ends in exactly one ``on_exited`` call, also when the zygote dies. ``reason``
is set when edge-agent, not the task, decided the outcome; then ``exit_code`` is one of the
``EXIT_*`` codes below. A task's own exit code says whether the supervisor and task process ran
to the end; the task's Airflow state (success, failed, up_for_retry) is reported by the
supervisor through the Execution API, so an exit code of 0 does not mean the task succeeded.

This module runs in the control process and must not import Airflow (a test pins that); the
zygote imports it for the shared constants and :func:`kill_tree`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_agent.errors import RuntimeUnavailable

log = logging.getLogger(__name__)

#: ``supervise_task`` raised: the Execution API refused ``/run`` (expired token, unknown TI) or
#: stayed unreachable through the SDK's retries. The task did not run.
EXIT_SUPERVISOR_ERROR = 70
#: The zygote died (or was killed at stop) while the job ran; the job's processes were killed.
EXIT_RUNTIME_LOST = 71
#: ``TaskAlreadyRunningError``: the task instance is already running (duplicate delivery). Do NOT
#: report a failure for it: a failure event would kill the healthy run elsewhere.
EXIT_DUPLICATE = 75
#: The job never started: invalid workload, bundle or DAG file missing on this agent, or the
#: runtime is stopping. ``reason`` says which.
EXIT_NOT_STARTED = 78

#: Between SIGTERM (the supervisor forwards it to the task, whose ``on_kill`` runs) and SIGKILL.
CANCEL_GRACE_SECONDS = 15.0
#: The zygote's stderr (import errors, supervisor logs, tracebacks), in the agent's log folder.
RUNTIME_LOG_NAME = "runtime.log"
_ROTATE_RUNTIME_LOG_BYTES = 10 * 1024 * 1024
_STDERR_TAIL_BYTES = 4096

#: ``on_started(job_id, pid, log_file)``; ``log_file`` is absolute, or None without a log path.
OnStarted = Callable[[str, int, "str | None"], None]
#: ``on_exited(job_id, exit_code, reason)``.
OnExited = Callable[[str, int, "str | None"], None]


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the zygote runs. ``executor`` is the hosted side's ``[core] executor`` string."""

    python: str
    airflow_home: Path
    dags_folder: Path | None
    log_folder: Path
    executor: str


class RuntimeStartError(RuntimeUnavailable):
    """The zygote died or did not become ready; the message carries the tail of its stderr."""


class RuntimeNotRunning(RuntimeUnavailable):
    """A job was submitted or cancelled while the zygote is not running (never started, stopping, dead)."""


def exit_code_from_status(status: int) -> int:
    """A ``waitpid`` status as a shell would show it: death by signal N becomes 128 + N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _process_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name, which may itself contain spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        children[int(fields[1])].append(int(entry.name))
    return children


def kill_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, its descendants, and every process group among them.

    The Task SDK puts the task process in its own process group, so signalling the supervisor's
    group alone would leave the task (and anything it spawned) running. Our own group is never
    signalled. Call it only for a pid that is not yet reaped (reaped pids may be reused).
    """
    children = _process_children()
    procs, todo = [], [pid]
    while todo:
        p = todo.pop()
        procs.append(p)
        todo.extend(children.get(p, ()))
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p))
        except (ProcessLookupError, PermissionError):
            pass
    groups.discard(os.getpgid(0))
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:  # members still in our own group, e.g. a child not yet in its own group
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Runtime:
    """Starts the zygote, submits and cancels jobs, and reports their start and exit.

    Callbacks run on the event-reader thread: keep them short and never call :meth:`stop` from one.
    A Runtime is started once; after it stopped or died, build a new one.
    """

    def __init__(
        self,
        settings: RuntimeSettings,
        on_started: OnStarted,
        on_exited: OnExited,
        *,
        ready_timeout: float = 180.0,
        stop_timeout: float = CANCEL_GRACE_SECONDS + 15.0,
    ) -> None:
        self.settings = settings
        self._on_started = on_started
        self._on_exited = on_exited
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self.log_file = settings.log_folder / RUNTIME_LOG_NAME

        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()  # also set when the zygote's stdout closes
        self._ready_info: dict[str, Any] | None = None
        self._write_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._jobs: dict[str, int | None] = {}  # job id -> supervisor pid once started
        self._lifecycle_lock = threading.Lock()
        self._stopping = False
        self._dead = False
        #: Seconds from spawning the zygote to its ``ready`` event.
        self.ready_seconds: float | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def sdk_version(self) -> str | None:
        return self._ready_info.get("sdk_version") if self._ready_info else None

    @property
    def alive(self) -> bool:
        return self._ready_info is not None and not self._dead and not self._stopping

    def running_jobs(self) -> dict[str, int | None]:
        """Submitted jobs that have not exited yet, with their supervisor pid once started."""
        with self._jobs_lock:
            return dict(self._jobs)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the zygote and wait until it has imported the Task SDK; raises RuntimeStartError."""
        from edge_agent.runtime.env import build_env

        with self._lifecycle_lock:
            if self._proc is not None:
                raise RuntimeUnavailable("this Runtime was already started; build a new one")
            env = build_env(self.settings)
            offset = self._prepare_log()
            argv = [self.settings.python, "-m", "edge_agent.runtime.zygote"]
            began = time.monotonic()
            with open(self.log_file, "ab") as stderr:
                try:
                    self._proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        env=env,
                        cwd=self.settings.airflow_home,
                        close_fds=True,
                        # Own session: a Ctrl-C on the agent's terminal must reach the control
                        # process only, which then drains; it must not kill the zygote mid-task.
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise RuntimeStartError(f"cannot start runtime python {self.settings.python}: {exc}") from exc
            self._reader = threading.Thread(target=self._read_events, name="runtime-events", daemon=True)
            self._reader.start()

            if not self._ready.wait(self._ready_timeout) or self._ready_info is None:
                died = self._dead
                if self._proc.poll() is None:
                    self._kill_zygote()
                self._reader.join()
                self._dead = True
                tail = self._stderr_tail(offset)
                what = (
                    f"exited with code {self._proc.returncode}"
                    if died
                    else f"was not ready after {self._ready_timeout:.0f} s"
                )
                hint = ""
                if "No module named 'edge_agent" in tail:
                    hint = f" (install edge-agent into the runtime environment of {self.settings.python})"
                elif "No module named 'airflow" in tail:
                    hint = f" (the runtime python {self.settings.python} has no Airflow Task SDK)"
                raise RuntimeStartError(
                    f"runtime zygote {what}{hint}; see {self.log_file}; last stderr: {tail or '(empty)'}"
                )
            self.ready_seconds = time.monotonic() - began
            log.info(
                "runtime ready: pid %s, task SDK %s, %.1f s", self._proc.pid, self.sdk_version, self.ready_seconds
            )

    def stop(self) -> None:
        """Ask the zygote to stop (it cancels running jobs with grace), wait, kill on timeout. Idempotent."""
        with self._lifecycle_lock:
            proc = self._proc
            if proc is None or self._stopping:
                return
            self._stopping = True
            try:
                self._write({"op": "stop"})
            except OSError:
                pass  # already gone; wait() below returns at once
            try:
                proc.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("runtime zygote did not stop within %.0f s; killing it and its jobs", self._stop_timeout)
                with self._jobs_lock:
                    pids = [pid for pid in self._jobs.values() if pid]
                for pid in pids:
                    kill_tree(pid, signal.SIGKILL)
                self._kill_zygote()
            if self._reader is not None:
                self._reader.join()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass  # unflushed bytes to a zygote that is gone

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, job_id: str, workload: dict[str, Any], socket_path: str) -> None:
        """Run ``workload`` (an ``ExecuteTask`` as JSON); ``socket_path`` is the forwarder's socket."""
        with self._jobs_lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id} is already running in this runtime")
            self._jobs[job_id] = None
        try:
            self._send({"op": "run", "job_id": job_id, "workload": workload, "socket": str(socket_path)})
        except RuntimeNotRunning:
            with self._jobs_lock:
                still_ours = self._jobs.pop(job_id, "gone") != "gone"
            if still_ours:  # otherwise the reader already reported the job as exited
                raise

    def cancel(self, job_id: str, reason: str, grace: float | None = None) -> bool:
        """SIGTERM the job's processes, SIGKILL after ``grace`` seconds (default CANCEL_GRACE_SECONDS);
        False if the job is not running."""
        with self._jobs_lock:
            if job_id not in self._jobs:
                return False
        message: dict[str, Any] = {"op": "cancel", "job_id": job_id, "reason": reason}
        if grace is not None:
            message["grace"] = grace
        self._send(message)
        return True

    # -- internals ----------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._proc is None or self._ready_info is None or self._dead or self._stopping:
            raise RuntimeNotRunning("the task runtime is not running")
        try:
            self._write(message)
        except OSError as exc:
            raise RuntimeNotRunning(f"the task runtime is gone: {exc}") from exc

    def _write(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._write_lock:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()

    def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout: IO[bytes] = self._proc.stdout
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("runtime sent a line that is not JSON: %r", line[:200])
                continue
            try:
                self._dispatch(event)
            except Exception:
                log.exception("runtime event handler failed for %s", event.get("ev"))
        code = self._proc.wait()
        self._dead = True
        self._ready.set()
        self._abandon_jobs(code)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "ready":
            self._ready_info = event
            self._ready.set()
        elif kind == "started":
            job_id = event["job_id"]
            with self._jobs_lock:
                if job_id not in self._jobs:
                    return
                self._jobs[job_id] = int(event["pid"])
            self._on_started(job_id, int(event["pid"]), event.get("log_file"))
        elif kind == "exited":
            job_id = event["job_id"]
            with self._jobs_lock:
                if self._jobs.pop(job_id, "gone") == "gone":
                    return
            self._on_exited(job_id, int(event["exit_code"]), event.get("reason"))
        else:
            log.warning("runtime sent an unknown event %r", kind)

    def _abandon_jobs(self, code: int) -> None:
        """The zygote is gone: kill what it left behind and report every open job as exited once."""
        with self._jobs_lock:
            jobs = dict(self._jobs)
            self._jobs.clear()
        if not self._stopping and self._ready_info is not None:
            log.error("runtime zygote exited unexpectedly with code %s; see %s", code, self.log_file)
        for job_id, pid in jobs.items():
            if pid:
                kill_tree(pid, signal.SIGKILL)
            why = "the runtime was stopped" if self._stopping else f"the runtime zygote exited with code {code}"
            try:
                self._on_exited(job_id, EXIT_RUNTIME_LOST, f"{why} before the job finished; see {self.log_file}")
            except Exception:
                log.exception("on_exited failed for job %s", job_id)

    def _kill_zygote(self) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # its session's group: the zygote alone
        except (ProcessLookupError, PermissionError):
            pass
        self._proc.wait()

    def _prepare_log(self) -> int:
        """Rotate an oversized runtime.log once; return the offset this run's stderr starts at."""
        try:
            size = self.log_file.stat().st_size
        except FileNotFoundError:
            return 0
        if size > _ROTATE_RUNTIME_LOG_BYTES:
            os.replace(self.log_file, self.log_file.with_name(RUNTIME_LOG_NAME + ".1"))
            return 0
        return size

    def _stderr_tail(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - _STDERR_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-12:])


__all__ = [
    "CANCEL_GRACE_SECONDS",
    "EXIT_DUPLICATE",
    "EXIT_NOT_STARTED",
    "EXIT_RUNTIME_LOST",
    "EXIT_SUPERVISOR_ERROR",
    "RUNTIME_LOG_NAME",
    "OnExited",
    "OnStarted",
    "Runtime",
    "RuntimeNotRunning",
    "RuntimeSettings",
    "RuntimeStartError",
    "exit_code_from_status",
    "kill_tree",
]
