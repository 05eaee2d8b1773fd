"""One job in a process forked from the zygote: becomes a Task SDK supervisor and runs the task.

Runs in the runtime Python and imports Airflow. :func:`run` is called in the forked child only;
it returns the process exit code (the zygote calls ``os._exit`` with it). The Execution API is
reached through the agent's forwarder socket, so this process holds a task token but never the
agent's key.
"""

from __future__ import annotations

import os
import signal
import ssl
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge_agent.runtime import EXIT_DUPLICATE, EXIT_SUPERVISOR_ERROR

if TYPE_CHECKING:
    import httpx
    from airflow.executors.workloads import ExecuteTask

#: Base URL the supervisor's client uses; the host part is a placeholder (the socket decides where
#: the request goes and the forwarder drops the Host header).
EXECUTION_BASE_URL = "http://edge-agent/execution/"
_MAX_REASON_BYTES = 3900  # JobReport.reason allows 4000 characters

#: The TLS context handed to the forwarder transport; built once by :func:`prepare` in the zygote.
_forwarder_tls: ssl.SSLContext | None = None


def prepare() -> None:
    """Build, once and before any fork, what every job would otherwise build for itself."""
    global _forwarder_tls
    _forwarder_tls = _unused_tls_context()


def _unused_tls_context() -> ssl.SSLContext:
    """A context that trusts no CA, for a transport that never speaks TLS.

    httpx builds a TLS context for every transport it is not given one for: ``ssl.create_default_context``
    plus certifi's bundle, 12.5 % of the agent tree's CPU samples in the benchmark, once per job, for
    a plain-HTTP Unix socket. A bare ``PROTOCOL_TLS_CLIENT`` context costs microseconds and still
    verifies host names and certificates: should the base URL ever become ``https://``, every
    handshake fails instead of going unverified.
    """
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def forwarder_transport(socket_path: str) -> httpx.HTTPTransport:
    """The supervisor's transport: plain HTTP to the forwarder's Unix socket, no per-job TLS setup."""
    import httpx

    return httpx.HTTPTransport(uds=socket_path, verify=_forwarder_tls or _unused_tls_context())


def run(workload: ExecuteTask, *, socket_path: str, reason_fd: int, close_fds: Iterable[int]) -> int:
    """Detach from the zygote, supervise the task, and return the exit code for ``os._exit``."""
    _detach(close_fds)
    try:
        from setproctitle import setproctitle

        setproctitle(f"edge-agent supervisor: {workload.ti.dag_id}.{workload.ti.task_id} {workload.ti.id}")
    except ImportError:
        pass

    from airflow.sdk.api.client import Client
    from airflow.sdk.exceptions import TaskAlreadyRunningError
    from airflow.sdk.execution_time.supervisor import supervise_task

    # Client's own TLS context (its verify=) is cached by the SDK and was built in the zygote; with
    # a transport given, httpx uses neither it nor proxies from the environment.
    client = Client(base_url=EXECUTION_BASE_URL, token=workload.token, transport=forwarder_transport(socket_path))
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


__all__ = ["EXECUTION_BASE_URL", "forwarder_transport", "prepare", "run"]
