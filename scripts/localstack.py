"""Start a whole edge-agent deployment on 127.0.0.1 (Airflow 3.3 on SQLite, gateway, agents) and drive it.

Shared by ``scripts/demo.py`` and the e2e tests (``tests/e2e/conftest.py``). One :class:`LocalStack`
owns one directory and every process it starts; :meth:`LocalStack.stop` ends them all.

Layout of ``home``::

    stack.env            0600, ``export`` lines: ``source`` it to run ``airflow ...`` against the stack
    airflow/             AIRFLOW_HOME (airflow.db, the CA under edge_agent/ca)
    task-logs/           [logging] base_log_folder (the gateway appends shipped agent logs here)
    logs/<name>.log      stdout+stderr of each component and agent; cli.log for one-shot commands
    agents/<name>/state  one agent's state dir: identity (0600 files), status, its task logs, its
                         runtime's AIRFLOW_HOME

Every component runs in its own process group (``start_new_session``) so that stopping it also
stops its children (LocalExecutor workers, the triggerer's runner, an agent's runtime zygote and
task processes), and so that a Ctrl-C in the terminal reaches only the driver, which then stops
the stack in order instead of every process dying at once mid-write.

The agents get a clean environment (no ``AIRFLOW*`` variable from the hosted side): what they know about Airflow comes from registration and ``--dags-folder``, as
it would on a customer's machine. In this local stack the agent reads the same DAG folder as the
hosted side; in production the agent has its own checkout of the same bundle (same bundle name).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from edge_agent.fsutil import atomic_write

T = TypeVar("T")

#: The bundle name every DAG lives in. The agent maps the same name to its ``--dags-folder``:
#: a workload names its bundle, and the Task SDK refuses a bundle it has no config for.
BUNDLE_NAME = "dags-folder"
EXECUTOR_NAME = "EdgeAgentExecutor"
HOSTED_EXECUTORS = "LocalExecutor,executor_plugin.EdgeAgentExecutor"
TERMINAL_RUN_STATES = ("success", "failed")

# Startup is slow on a shared 2-core box (the notes measured 40 s for the api-server alone when
# all four components start at once); these bound a hang, they are not expectations.
STARTUP_TIMEOUT = 300.0
CLI_TIMEOUT = 180.0
AGENT_READY_TIMEOUT = 180.0
STOP_GRACE = 20.0

_BIN = Path(sys.executable).parent


# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------


class StackError(RuntimeError):
    """Base of everything this module raises; the message carries what to look at."""


class CommandFailed(StackError):
    """A one-shot command (``airflow db migrate``, ``edge-agent register``...) exited non-zero."""


class ComponentDied(StackError):
    """A long-running component exited while we were waiting for it (or for something else)."""


class WaitTimeout(StackError):
    """A readiness condition or a run did not reach the wanted state in time."""


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the kernel picks it; a race with another binder is rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (no moment where it is world-readable)."""
    atomic_write(path, text.encode(), 0o600)


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file (reads at most the last 256 KiB)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    # An AIRFLOW__* or AIRFLOW_HOME inherited from the developer's shell would silently point a
    # component at another database or config; every component gets exactly what we set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the driver dies, even by SIGKILL (Linux only).

    Without it a driver killed outright (a CI timeout, ``kill -9``) leaves the whole stack running,
    holding ports and the SQLite file. SIGTERM lets the leader stop its own children.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Waiter:
    """Repeats a check with a growing pause until it returns a value, a process dies, or time runs out."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping

    def until(
        self,
        what: str,
        check: Callable[[], T | None],
        timeout: float,
        watch: Sequence["Component"] = (),
        context: Callable[[], str] = lambda: "",
    ) -> T:
        deadline = time.monotonic() + timeout
        pause = 0.25
        last_error = ""
        while True:
            for comp in watch:
                if not comp.stopped and comp.proc.poll() is not None:
                    raise ComponentDied(
                        f"{comp.name} exited with {comp.proc.returncode} while waiting for {what}\n"
                        f"--- {comp.log_path} ---\n{tail(comp.log_path, 60)}\n{context()}"
                    )
            try:
                result = check()
            except (httpx.HTTPError, OSError, ValueError, StackError) as exc:
                result, last_error = None, f"{type(exc).__name__}: {exc}"
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what} {last_error}\n{context()}")
            # A stop request (Ctrl-C in the demo, fixture teardown) must not wait out a long pause.
            if self._stopping.wait(min(pause, max(0.0, deadline - time.monotonic()))):
                raise StackError(f"stack is stopping; gave up waiting for {what}")
            pause = min(pause * 2, 2.0)


@dataclass
class Component:
    """One long-running process of the stack, leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is already gone

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the group, wait up to ``grace`` for the leader, then SIGKILL whatever is left.

        Runs once: a second SIGTERM means "stop now" to an agent, and a later killpg could hit a
        reused process-group id.
        """
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.alive:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children outlive a leader that exits first (LocalExecutor workers, a task process).
        self.signal_group(signal.SIGKILL)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class AgentProcess(Component):
    """A registered agent running ``edge-agent run``."""

    agent_id: str = ""
    state_dir: Path = field(default_factory=Path)
    dags_folder: Path = field(default_factory=Path)
    queues: tuple[str, ...] = ()
    region: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """``edge-agent status --json`` of this agent."""
        out = _run_checked(
            [str(_BIN / "edge-agent"), "status", "--state-dir", str(self.state_dir), "--json"],
            env=self.env,
            what=f"edge-agent status ({self.name})",
            log_path=self.log_path.with_name("cli.log"),
        )
        return json.loads(out)


@dataclass(frozen=True)
class TaskInstance:
    """The fields of Airflow's TI REST model the demo and the tests look at."""

    task_id: str
    map_index: int
    state: str | None
    try_number: int
    executor: str | None
    queue: str | None
    hostname: str | None
    pid: int | None
    queued_at: datetime | None
    start_date: datetime | None
    end_date: datetime | None

    @classmethod
    def from_api(cls, row: Mapping[str, Any]) -> "TaskInstance":
        return cls(
            task_id=row["task_id"],
            map_index=row["map_index"],
            state=row["state"],
            try_number=row["try_number"],
            executor=row.get("executor"),
            queue=row.get("queue"),
            hostname=row.get("hostname"),
            pid=row.get("pid"),
            queued_at=parse_time(row.get("queued_when")),
            start_date=parse_time(row.get("start_date")),
            end_date=parse_time(row.get("end_date")),
        )

    @property
    def queued_to_start(self) -> float | None:
        if self.queued_at and self.start_date:
            return (self.start_date - self.queued_at).total_seconds()
        return None


def _run_checked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    what: str,
    log_path: Path,
    secret_output: bool = False,
    timeout: float = CLI_TIMEOUT,
    cwd: Path | None = None,
) -> str:
    """Run a one-shot command; return stdout; append stderr (and stdout unless secret) to ``log_path``."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{what} did not finish in {timeout:.0f}s") from exc
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {what} (rc={done.returncode}, {time.monotonic() - started:.1f}s)\n")
        # Token commands print a secret: it goes to the caller, never to a log file.
        log.write("(stdout withheld: contains a secret)\n" if secret_output else done.stdout)
        log.write(done.stderr)
    if done.returncode != 0:
        raise CommandFailed(
            f"{what} exited {done.returncode}\n--- stderr (tail) ---\n"
            + "\n".join(done.stderr.splitlines()[-40:])
        )
    return done.stdout


def _json_from_output(text: str, what: str) -> Any:
    """Parse a command's JSON output, skipping any log lines Airflow prints before it."""
    lines = text.strip().splitlines()
    for first, line in enumerate(lines):
        if line.startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[first:]))
            except ValueError:
                continue
    raise StackError(f"{what}: expected JSON output, got: {text[-500:]!r}")


# -------------------------------------------------------------------------------------------------
# The stack
# -------------------------------------------------------------------------------------------------


class LocalStack:
    """A hosted side (api-server, scheduler, dag-processor, triggerer, gateway) plus agents, on loopback."""

    def __init__(self, home: Path, dags: Path, *, statsd_port: int | None = None) -> None:
        self.home = home.resolve()
        self.dags = dags.resolve()
        #: When set, every hosted component sends Airflow's StatsD metrics to 127.0.0.1:<port>.
        self.statsd_port = statsd_port
        self.airflow_home = self.home / "airflow"
        self.logs_dir = self.home / "logs"
        self.task_logs_dir = self.home / "task-logs"
        self.api_port = free_port()
        self.gateway_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.gateway_url = f"https://127.0.0.1:{self.gateway_port}"
        self.components: list[Component] = []
        self.agents: list[AgentProcess] = []
        self._stopping = threading.Event()
        self._wait = _Waiter(self._stopping)
        self._env: dict[str, str] = {}
        self._api: httpx.Client | None = None
        self._ca_file: Path | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "LocalStack":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment of the hosted components (contains the JWT secret: never log it)."""
        return dict(self._env)

    def start(self) -> None:
        """Create the deployment and start every hosted component; return when all are ready."""
        if self.home.exists() and any(self.home.iterdir()):
            raise StackError(f"{self.home} is not empty: a stack needs a fresh directory")
        for path in (self.airflow_home, self.logs_dir, self.task_logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._env = self._hosted_env()
        write_private(
            self.home / "stack.env",
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self._env.items()) if k.startswith("AIRFLOW")),
        )
        try:
            self._airflow(["db", "migrate"], "airflow db migrate")
            # Independent of each other: the CA is files, reserialize writes the DAG rows. Parsing the
            # DAGs here (not waiting for the dag-processor's first loop) makes them exist, unpaused,
            # before the scheduler starts, so the first trigger never races the parser.
            self._parallel(
                ("airflow edge-agents ca init", ["edge-agents", "ca", "init", "--json"]),
                ("airflow dags reserialize", ["dags", "reserialize"]),
            )
            self._find_ca_file()
            api = self._spawn(
                "api-server",
                [str(_BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(self.api_port)],
            )
            hosted = [
                api,
                self._spawn("scheduler", [str(_BIN / "airflow"), "scheduler", "--skip-serve-logs"]),
                self._spawn("dag-processor", [str(_BIN / "airflow"), "dag-processor"]),
                self._spawn("triggerer", [str(_BIN / "airflow"), "triggerer", "--skip-serve-logs"]),
                self._spawn(
                    "gateway",
                    [
                        str(_BIN / "airflow"), "edge-agents", "gateway",
                        "--host", "127.0.0.1", "--port", str(self.gateway_port),
                    ],
                ),
                *self._more_hosted(),
            ]
            self._wait.until("api-server and job heartbeats", self._health_ok, STARTUP_TIMEOUT, hosted, self._ctx)
            self._wait.until("gateway trust bundle over TLS", self._gateway_ok, STARTUP_TIMEOUT, hosted, self._ctx)
            self._warm_execution_api()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop agents first (they drain and report), then the hosted side. Safe to call twice."""
        self._stopping.set()
        if self._api is not None:
            self._api.close()
            self._api = None
        for group in (list(self.agents), list(self.components)):
            threads = [threading.Thread(target=c.stop, daemon=True) for c in group]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(STOP_GRACE + 15)

    # ---- environment and processes --------------------------------------------------------------

    def _hosted_env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        metrics = {} if self.statsd_port is None else {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.statsd_port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        }
        return _clean_env(
            {
                **metrics,
                "AIRFLOW_HOME": str(self.airflow_home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": HOSTED_EXECUTORS,
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                # LocalExecutor forks `parallelism` idle workers at start (32 by default, ~300 MB).
                "AIRFLOW__CORE__PARALLELISM": "8",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
                    [
                        {
                            "name": BUNDLE_NAME,
                            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                            "kwargs": {},
                        }
                    ]
                ),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                # HS512 warns below 64 bytes; api-server, scheduler and gateway must share it.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.task_logs_dir),
                # serve-logs is skipped, but these must still not collide with another stack's ports.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                # The supervisor notices a finished task only on its heartbeat tick (default 5 s).
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )

    def _airflow(self, args: list[str], what: str, *, secret_output: bool = False) -> str:
        return _run_checked(
            [str(_BIN / "airflow"), *args],
            env=self._env,
            what=what,
            log_path=self.logs_dir / "cli.log",
            secret_output=secret_output,
            cwd=self.home,
        )

    def _parallel(self, *commands: tuple[str, list[str]]) -> None:
        errors: list[BaseException] = []

        def run(what: str, args: list[str]) -> None:
            try:
                self._airflow(args, what)
            except BaseException as exc:  # re-raised below in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=cmd, daemon=True) for cmd in commands]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _more_hosted(self) -> list[Component]:
        """Hook: more hosted components to start with the standard ones (a second scheduler...)."""
        return []

    def respawn(self, old: Component) -> Component:
        """Start a component again with the same argv, environment and log file; return the new one.

        The caller ends the old process first (``stop()``, or a fault it injected). The new
        component takes the old one's place in :attr:`components` or :attr:`agents`; an agent
        keeps its state dir (no new registration), a gateway or scheduler its port and config.
        Call it from the thread that started the stack: the child gets SIGTERM when the thread that
        started it ends (``PR_SET_PDEATHSIG`` follows the thread, not the process).
        """
        if old.alive:
            raise StackError(f"{old.name} (pid {old.proc.pid}) is still running: end it before respawning")
        # The old group may still hold children (a killed agent's zygote): they would hold its
        # state-dir lock or a task's slot. Nothing of it may outlive the respawn.
        old.stopped = True
        old.signal_group(signal.SIGKILL)
        is_agent = isinstance(old, AgentProcess)
        env = old.env if is_agent else self._env
        cwd = old.state_dir.parent if is_agent else self.home
        with old.log_path.open("ab") as log:
            log.write(f"\n===== {old.name} restarted by the stack driver =====\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(old.proc.args), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        if is_agent:
            new: Component = AgentProcess(
                name=old.name, proc=proc, log_path=old.log_path, agent_id=old.agent_id, state_dir=old.state_dir,
                dags_folder=old.dags_folder, queues=old.queues, region=old.region, env=dict(old.env),
            )
            group: list[Any] = self.agents
        else:
            new = Component(name=old.name, proc=proc, log_path=old.log_path)
            group = self.components
        group[group.index(old)] = new
        return new

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Component:
        log_path = self.logs_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, env=dict(env or self._env), cwd=self.home, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        comp = Component(name=name, proc=proc, log_path=log_path)
        self.components.append(comp)
        return comp

    # ---- readiness ------------------------------------------------------------------------------

    def _health_ok(self) -> bool | None:
        reply = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=10)
        if reply.status_code != 200:
            return None
        health = reply.json()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return True if all((health.get(p) or {}).get("status") == "healthy" for p in parts) else None

    def _find_ca_file(self) -> None:
        """Write the CA certificates found under the CA dir to one bundle file the driver trusts."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        ca_dir = self.airflow_home / "edge_agent" / "ca"
        pems: list[str] = []
        for path in sorted(ca_dir.rglob("*")) if ca_dir.exists() else []:
            if not path.is_file() or path.stat().st_size > 64 * 1024:
                continue
            data = path.read_bytes()
            if b"-----BEGIN CERTIFICATE-----" not in data:
                continue
            for cert in x509.load_pem_x509_certificates(data):
                try:
                    is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                except x509.ExtensionNotFound:
                    is_ca = False
                if is_ca:
                    pems.append(cert.public_bytes(Encoding.PEM).decode())
        if not pems:
            raise StackError(f"'airflow edge-agents ca init' left no CA certificate under {ca_dir}")
        self._ca_file = self.home / "ca-bundle.pem"
        self._ca_file.write_text("".join(dict.fromkeys(pems)))

    def tls_context(self) -> ssl.SSLContext:
        """Client TLS context trusting only the stack's CA (no client certificate)."""
        assert self._ca_file is not None, "start() first"
        return ssl.create_default_context(cafile=str(self._ca_file))

    def _gateway_ok(self) -> bool | None:
        reply = httpx.get(f"{self.gateway_url}/agents/v1/trust-bundle", verify=self.tls_context(), timeout=10)
        return True if reply.status_code == 200 and reply.json().get("ca_pems") else None

    def _warm_execution_api(self) -> None:
        # The first request to a fresh Execution API app takes 5-12 s here, longer than the Task
        # SDK's default 5 s timeout: a LocalExecutor task's first call would time out and retry.
        # Pay it now on the api-server. The gateway's mount cannot be warmed from outside: it
        # answers 401 to a caller without an agent certificate before the request reaches
        # Airflow's app, so warming it is the gateway's own job (agents allow 30 s meanwhile).
        httpx.get(f"{self.api_url}/execution/health", timeout=60)

    def _ctx(self) -> str:
        return self.log_tails(40)

    # ---- admin commands and agents --------------------------------------------------------------

    def mint_token(
        self, queues: Iterable[str], region: str, *, ttl: str = "15m", uses: int = 1, name: str | None = None
    ) -> str:
        """A registration token from ``airflow edge-agents token create`` (the text, a secret)."""
        args = ["edge-agents", "token", "create", "--region", region, "--ttl", ttl, "--uses", str(uses), "--json"]
        for queue in queues:
            args += ["--queue", queue]
        if name:
            args += ["--name", name]
        out = self._airflow(args, "airflow edge-agents token create", secret_output=True)
        return str(_json_from_output(out, "token create")["token"])

    def list_agents(self) -> list[dict[str, Any]]:
        out = self._airflow(["edge-agents", "list", "--json"], "airflow edge-agents list")
        data = _json_from_output(out, "edge-agents list")
        return list(data["agents"] if isinstance(data, dict) else data)

    def start_agent(
        self,
        name: str,
        queues: Sequence[str],
        region: str,
        *,
        concurrency: int = 4,
        extra_env: Mapping[str, str] | None = None,
        dags_folder: Path | None = None,
        gateway_url: str | None = None,
    ) -> AgentProcess:
        """Mint a token, register over the gateway, start ``edge-agent run``; return when it leases.

        ``gateway_url`` (default: the stack's gateway) is the URL the agent registers with and keeps
        using, e.g. a proxy in front of a gateway; its certificate must cover the host.
        """
        agent_dir = self.home / "agents" / name
        state_dir = agent_dir / "state"
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dags = (dags_folder or self.dags).resolve()
        env = _clean_env(
            {
                # Never touch the developer's real keyring: keep the identity in 0600 files in the
                # state dir, which the stack deletes with everything else.
                "EDGE_AGENT_SECRET_BACKEND": "file",
                "PYTHONUNBUFFERED": "1",
                **(extra_env or {}),
            }
        )
        token_file = agent_dir / "registration.token"
        write_private(token_file, self.mint_token(queues, region, name=name) + "\n")
        log_path = self.logs_dir / f"agent-{name}.log"
        try:
            _run_checked(
                [
                    str(_BIN / "edge-agent"), "register", "--url", gateway_url or self.gateway_url,
                    "--token-file", str(token_file), "--state-dir", str(state_dir), "--name", name,
                ],
                env=env, what=f"edge-agent register ({name})", log_path=self.logs_dir / "cli.log",
            )
        finally:
            token_file.unlink(missing_ok=True)  # single use, and a secret: do not leave it around
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(_BIN / "edge-agent"), "run", "--state-dir", str(state_dir),
                    "--concurrency", str(concurrency), "--dags-folder", str(dags),
                ],
                env=env, cwd=agent_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        agent = AgentProcess(
            name=name, proc=proc, log_path=log_path, state_dir=state_dir, dags_folder=dags,
            queues=tuple(queues), region=region, env=env,
        )
        self.agents.append(agent)
        status = self._wait.until(
            f"agent {name} to be ready", lambda: self._agent_ready(agent), AGENT_READY_TIMEOUT, [agent], self._ctx
        )
        agent.agent_id = str(status["identity"]["agent_id"])
        return agent

    @staticmethod
    def _agent_ready(agent: AgentProcess) -> dict[str, Any] | None:
        """The status once the gateway accepts the agent and its lease loop is waiting for work."""
        status = agent.status()  # exits non-zero (CommandFailed, retried) until the gateway accepts it
        run = status.get("agent") or {}
        leasing = str((run.get("activity") or {}).get("lease", "")).startswith("waiting for work")
        if status["gateway"]["accepted"] and run.get("alive") and run.get("state") == "running" and leasing:
            return status
        return None

    # ---- REST (through the api-server) ----------------------------------------------------------

    @property
    def api(self) -> httpx.Client:
        """A client for the public REST API, authenticated as an admin."""
        if self._api is None:
            # SimpleAuthManager with all-admins hands out an admin JWT at GET /auth/token.
            reply = httpx.get(f"{self.api_url}/auth/token", timeout=30)
            reply.raise_for_status()
            self._api = httpx.Client(
                base_url=self.api_url,
                headers={"Authorization": f"Bearer {reply.json()['access_token']}"},
                timeout=60,
            )
        return self._api

    def _rest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        reply = self.api.request(method, path, **kwargs)
        if reply.status_code >= 400:
            raise StackError(f"{method} {path} -> {reply.status_code}: {reply.text[:1000]}")
        return reply

    def set_variable(self, key: str, value: str) -> None:
        reply = self.api.post("/api/v2/variables", json={"key": key, "value": value})
        if reply.status_code == 409:
            self._rest("PATCH", f"/api/v2/variables/{key}", json={"key": key, "value": value})
        elif reply.status_code >= 400:
            raise StackError(f"creating variable {key} -> {reply.status_code}: {reply.text[:500]}")

    def unpause(self, dag_id: str, timeout: float = 120.0) -> None:
        """Wait until the DAG is known (parsed), then unpause it."""

        def known() -> bool | None:
            return True if self.api.get(f"/api/v2/dags/{dag_id}").status_code == 200 else None

        self._wait.until(f"DAG {dag_id} to be parsed", known, timeout, self.components, self._ctx)
        self._rest("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Trigger a run now; return its run id."""
        self.unpause(dag_id)
        reply = self._rest(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": dict(conf or {})}
        )
        return str(reply.json()["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self._rest("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 180.0) -> str:
        """Wait until the run is success or failed; return that state."""

        def done() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in TERMINAL_RUN_STATES else None

        return self._wait.until(
            f"run {dag_id}/{run_id} to finish", done, timeout, self.components + self.agents,
            lambda: self.describe_run(dag_id, run_id) + "\n" + self.log_tails(40),
        )

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> None:
        self._rest("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": state})

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstance]:
        reply = self._rest("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        rows = [TaskInstance.from_api(row) for row in reply.json()["task_instances"]]
        return sorted(rows, key=lambda ti: (ti.start_date is None, ti.start_date or datetime.max, ti.task_id, ti.map_index))

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> TaskInstance:
        for ti in self.task_instances(dag_id, run_id):
            if ti.task_id == task_id and ti.map_index == map_index:
                return ti
        raise StackError(f"no task instance {dag_id}/{run_id}/{task_id}[{map_index}]")

    def task_tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[TaskInstance]:
        """Every try of one task (history included), oldest first."""
        reply = self._rest(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
            if map_index >= 0 else f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/tries",
        )
        return sorted((TaskInstance.from_api(r) for r in reply.json()["task_instances"]), key=lambda t: t.try_number)

    def wait_ti_state(
        self, dag_id: str, run_id: str, task_id: str, states: Sequence[str], timeout: float = 120.0,
        map_index: int = -1,
    ) -> TaskInstance:
        def reached() -> TaskInstance | None:
            ti = self.task_instance(dag_id, run_id, task_id, map_index)
            return ti if ti.state in states else None

        return self._wait.until(
            f"{dag_id}/{task_id}[{map_index}] to reach {list(states)}", reached, timeout,
            self.components + self.agents, lambda: self.describe_run(dag_id, run_id) + "\n" + self.log_tails(40),
        )

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        reply = self._rest(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": "true"},
        )
        return reply.json()["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task's log as Airflow's REST API serves it, rendered as text lines."""
        reply = self._rest(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true", "map_index": map_index},
            headers={"Accept": "application/json"},
        )
        lines = []
        for item in reply.json().get("content") or []:
            if isinstance(item, str):
                lines.append(item)
                continue
            extra = {k: v for k, v in item.items() if k not in ("event", "timestamp", "level")}
            lines.append(
                f"{item.get('timestamp', '')} {item.get('level', '')} {item.get('event', '')}"
                + (f" {json.dumps(extra, default=str)}" if extra else "")
            )
        return "\n".join(lines)

    def wait_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int, needle: str, timeout: float = 60.0,
        map_index: int = -1,
    ) -> str:
        """Wait until the REST log contains ``needle`` (agent logs arrive shortly after the task ends)."""
        last = {"text": ""}

        def found() -> str | None:
            last["text"] = self.task_log(dag_id, run_id, task_id, try_number, map_index)
            return last["text"] if needle in last["text"] else None

        return self._wait.until(
            f"log of {dag_id}/{task_id}[{map_index}] try {try_number} to contain {needle!r}", found, timeout, (),
            lambda: f"--- last log text ---\n{last['text'][-3000:]}\n{self.log_tails(40)}",
        )

    # ---- our own tables (read-only; for the demo's "which agent" column and test evidence) ------

    def _db_rows(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        uri = f"file:{self.airflow_home / 'airflow.db'}?mode=ro"
        try:
            with sqlite3.connect(uri, uri=True, timeout=30) as conn:
                conn.row_factory = sqlite3.Row
                return [dict(row) for row in conn.execute(sql, params)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def agent_jobs(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Rows of ``edge_agent_job`` for one run (rows are purged some time after they are reported)."""
        return self._db_rows(
            "SELECT id, task_id, map_index, try_number, queue, state, agent_id, reason, queued_at, leased_at,"
            " started_at, finished_at FROM edge_agent_job WHERE dag_id = ? AND run_id = ?"
            " ORDER BY queued_at",
            (dag_id, run_id),
        )

    def agent_names(self) -> dict[str, str]:
        return {r["id"]: r["name"] for r in self._db_rows("SELECT id, name FROM edge_agent_agent", ())}

    # ---- diagnostics ----------------------------------------------------------------------------

    def describe_run(self, dag_id: str, run_id: str) -> str:
        try:
            rows = self.task_instances(dag_id, run_id)
            jobs = self.agent_jobs(dag_id, run_id)
        except (StackError, httpx.HTTPError, sqlite3.Error) as exc:
            return f"(could not read run {run_id}: {exc})"
        out = [f"--- task instances of {dag_id}/{run_id} ---"]
        out += [
            f"{ti.task_id}[{ti.map_index}] state={ti.state} try={ti.try_number} executor={ti.executor} "
            f"queue={ti.queue} host={ti.hostname} pid={ti.pid}"
            for ti in rows
        ]
        out.append("--- edge_agent_job rows ---")
        out += [json.dumps(job, default=str) for job in jobs] or ["(none)"]
        return "\n".join(out)

    def log_tails(self, lines: int = 40) -> str:
        """The last lines of every component and agent log, for failure messages."""
        parts = []
        for comp in [*self.components, *self.agents]:
            state = "running" if comp.alive else f"exited {comp.proc.returncode}"
            parts.append(f"--- {comp.name} ({state}) {comp.log_path} ---\n{tail(comp.log_path, lines)}")
        parts.append(f"--- cli.log ---\n{tail(self.logs_dir / 'cli.log', lines)}")
        return "\n".join(parts)


__all__ = [
    "AgentProcess",
    "BUNDLE_NAME",
    "CommandFailed",
    "Component",
    "ComponentDied",
    "EXECUTOR_NAME",
    "LocalStack",
    "StackError",
    "TaskInstance",
    "WaitTimeout",
    "free_port",
    "tail",
    "write_private",
]
