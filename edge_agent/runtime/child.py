"""One job in a process forked from the zygote: becomes a Task SDK supervisor and runs the task.

Runs in the runtime Python and imports Airflow. :func:`run` is called in the forked child only;
it returns the process exit code (the zygote calls ``os._exit`` with it). The Execution API is
reached through the agent's forwarder socket, so this process holds a task token but never the
agent's key.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge_agent.runtime import EXIT_DUPLICATE, EXIT_SUPERVISOR_ERROR

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecuteTask

#: Base URL the supervisor's client uses; the host part is a placeholder (the socket decides where
#: the request goes and the forwarder drops the Host header).
EXECUTION_BASE_URL = "http://edge-agent/execution/"
_MAX_REASON_BYTES = 3900  # JobReport.reason allows 4000 characters


def run(workload: ExecuteTask, *, socket_path: str, reason_fd: int, close_fds: Iterable[int]) -> int:
    """Detach from the zygote, supervise the task, and return the exit code for ``os._exit``."""
    _detach(close_fds)
    try:
        from setproctitle import setproctitle

        setproctitle(f"edge-agent supervisor: {workload.ti.dag_id}.{workload.ti.task_id} {workload.ti.id}")
    except ImportError:
        pass

    import httpx
    from airflow.sdk.api.client import Client
    from airflow.sdk.exceptions import TaskAlreadyRunningError
    from airflow.sdk.execution_time.supervisor import supervise_task

    client = Client(
        base_url=EXECUTION_BASE_URL, token=workload.token, transport=httpx.HTTPTransport(uds=socket_path)
    )
    try:
        code = supervise_task(
            ti=workload.ti,  # the workload's TaskInstanceDTO duck-types the SDK's TaskInstance
            bundle_info=workload.bundle_info,
            dag_rel_path=workload.dag_rel_path,
            token=workload.token,
            log_path=workload.log_path,
            client=client,
            sentry_integration=workload.sentry_integration,
        )
    except TaskAlreadyRunningError:
        # A duplicate delivery: the task instance runs elsewhere. Failing it would kill that run.
        _write_reason(reason_fd, f"task instance {workload.ti.id} is already running (duplicate delivery); not run here")
        return EXIT_DUPLICATE
    except Exception as exc:
        traceback.print_exc()
        _write_reason(reason_fd, f"task supervisor failed before the task could finish: {type(exc).__name__}: {exc}")
        return EXIT_SUPERVISOR_ERROR
    finally:
        client.close()
    code = int(code)
    # supervise_task reports a task process killed by signal N as -N.
    return 128 - code if code < 0 else code & 0xFF


def _detach(close_fds: Iterable[int]) -> None:
    """Undo the zygote's process state the supervisor must not inherit."""
    # The zygote's wakeup fd and handlers would swallow the supervisor's SIGCHLD/SIGTERM handling.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # Own process group: cancel signals the job's group without touching the zygote or other jobs.
    os.setpgrp()
    # The protocol pipe, the zygote's selector and other jobs' fds: a child holding the protocol
    # pipe open would hide the zygote's death from the control process.
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _write_reason(fd: int, reason: str) -> None:
    try:
        os.write(fd, reason.encode(errors="replace")[:_MAX_REASON_BYTES])
    except OSError:
        pass


__all__ = ["EXECUTION_BASE_URL", "run"]
