"""The hosted side on a PostgreSQL database, as the real commands run it: ``HostedPg``.

One :class:`HostedPg` owns one ``AIRFLOW_HOME`` (a temp dir) and the environment every hosted
command of that deployment shares: the database URL (psycopg 3, sync and async), one JWT secret
(gateways sign workload tokens with it, so every gateway must have the same one), the log folder.
It runs one-shot ``airflow`` commands (``db migrate``, ``edge-agents ca init``)
and starts ``airflow edge-agents gateway`` processes on free loopback ports.

Each gateway is the leader of its own process group and gets SIGTERM if this process dies
(``PR_SET_PDEATHSIG``), so a killed test run leaves no gateway holding a port. Its output is pumped
by a thread into ``logs/<name>.log`` for the whole life of the process (a full pipe would block its
logging); that thread also turns the "gateway listening" line into an event, so start-up is waited
on, not polled.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from localstack import Component, StackError, _clean_env, _die_with_parent, _json_from_output, free_port, tail

AIRFLOW = Path(sys.executable).parent / "airflow"
CLI_TIMEOUT = 300.0
GATEWAY_START_TIMEOUT = 240.0
GATEWAY_STOP_TIMEOUT = 60.0
_LISTENING = re.compile(rb"gateway listening on https://127\.0\.0\.1:(\d+)")
#: One access-log line of the gateway (uvicorn): '"POST /agents/v1/lease HTTP/1.1" 200'.
ACCESS_LINE = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (/[^ "?]*)[^"]*" (\d{3})')


class HostedError(AssertionError):
    """A hosted command failed or a gateway did not start; the message carries its output."""


@dataclass
class Gateway(Component):
    """One ``airflow edge-agents gateway`` process (a :class:`localstack.Component`: same stop)."""

    port: int = 0
    listening: threading.Event = field(default_factory=threading.Event)
    pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode}"
        return f"--- gateway {self.name} ({state}) {self.log_path} ---\n{tail(self.log_path, lines)}"

    def statuses(self) -> dict[str, list[int]]:
        """HTTP statuses the gateway answered, by path (from its access log)."""
        out: dict[str, list[int]] = {}
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for match in ACCESS_LINE.finditer(text):
            out.setdefault(match.group(2), []).append(int(match.group(3)))
        return out

    def stop(self, grace: float = GATEWAY_STOP_TIMEOUT) -> int | None:
        """SIGTERM the group, SIGKILL what is left after ``grace``; the exit code. Joins the log pump."""
        code = super().stop(grace)
        if self.pump is not None:
            self.pump.join(10)
        return code


class HostedPg:
    """``AIRFLOW_HOME`` + environment of one deployment on ``db_url``, and the gateways it started."""

    def __init__(self, home: Path, db_url: str) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        async_url = make_url(db_url).set(drivername="postgresql+psycopg_async").render_as_string(hide_password=False)
        # Nothing inherited from the developer's shell may point a command at another database.
        self.env = _clean_env(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "executor_plugin.EdgeAgentExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
                # Left unset, Airflow derives postgresql+asyncpg:// and fails without asyncpg.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": async_url,
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "task-logs"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.gateways: list[Gateway] = []

    def airflow(self, *args: str) -> str:
        """Run ``airflow ARGS``; return stdout; raise with the output tail when it fails.

        stdout is returned to the caller and never written to a log: ``token create`` prints a secret.
        """
        done = subprocess.run(
            [str(AIRFLOW), *args], env=self.env, cwd=self.home, capture_output=True, text=True,
            timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise HostedError(f"airflow {' '.join(args[:3])} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done.stdout

    def airflow_json(self, *args: str) -> Any:
        """``airflow ARGS`` whose output is JSON, possibly after log lines."""
        try:
            return _json_from_output(self.airflow(*args), f"airflow {' '.join(args[:3])}")
        except StackError as exc:
            raise HostedError(str(exc)) from None

    def start_gateways(self, *names: str) -> list[Gateway]:
        """Start one ``airflow edge-agents gateway`` per name, all at once; return once all listen.

        Call it from a thread that outlives the gateways (the test's main thread): the kernel sends
        the death signal when the *thread* that forked them ends, not the process.
        """
        gateways = [self._spawn_gateway(name) for name in names]
        for gateway in gateways:
            if not gateway.listening.wait(GATEWAY_START_TIMEOUT) or gateway.proc.poll() is not None:
                raise HostedError(
                    f"gateway {gateway.name} did not start listening on {gateway.port}\n{gateway.log_tail()}"
                )
        return gateways

    def _spawn_gateway(self, name: str) -> Gateway:
        port = free_port()
        log_path = self.logs / f"gateway-{name}.log"
        proc = subprocess.Popen(
            [str(AIRFLOW), "edge-agents", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            env=self.env, cwd=self.home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        gateway = Gateway(name=name, port=port, proc=proc, log_path=log_path)
        self.gateways.append(gateway)
        gateway.pump = threading.Thread(target=_pump, args=(gateway,), name=f"pump-{name}", daemon=True)
        gateway.pump.start()
        return gateway

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(g.log_tail(lines) for g in self.gateways)

    def stop(self) -> dict[str, int | None]:
        """Stop every gateway (in parallel); their exit codes by name."""
        codes: dict[str, int | None] = {}

        def stop_one(g: Gateway) -> None:
            codes[g.name] = g.stop()

        threads = [threading.Thread(target=stop_one, args=(g,), daemon=True) for g in self.gateways]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GATEWAY_STOP_TIMEOUT + 30)
        return codes


def _pump(gateway: Gateway) -> None:
    """Copy the gateway's output to its log file; set ``listening`` on its start line (or at EOF)."""
    assert gateway.proc.stdout is not None
    with gateway.log_path.open("ab") as log:
        for line in iter(gateway.proc.stdout.readline, b""):
            log.write(line)
            log.flush()
            match = _LISTENING.search(line)
            if match and int(match.group(1)) == gateway.port:
                gateway.listening.set()
    gateway.proc.stdout.close()
    gateway.listening.set()  # ended: wake the waiter, which then sees the exit


__all__ = ["ACCESS_LINE", "Gateway", "HostedError", "HostedPg"]
