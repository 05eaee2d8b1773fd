"""Fixtures: a real gateway process over real TLS on a temporary SQLite Airflow database.

The gateway runs as a subprocess (``executor_plugin.gateway.server.serve`` on 127.0.0.1, port 0)
with its own ``AIRFLOW_HOME``; this process talks to the same SQLite file through its own engine
and the real ``store`` functions, the way the scheduler would. The edge-agent tables are created
with ``models.metadata.create_all`` (Airflow's own tables are not needed by the gateway).

Use ``gateway`` (one process per test session) for most tests and ``start_gateway`` for a private
one (e.g. to stop it). ``gateway.register()`` enrolls an agent through the real register route.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from edge_agent.identity.pki_utils import generate_key, make_csr
from edge_agent.protocol import REGISTER_PATH, AgentIdentity, RegistrationToken
from executor_plugin import store
from executor_plugin.models import metadata
from executor_plugin.pki import CertificateAuthority

TRUST_DOMAIN = "it.edge-agent.test"
EXECUTOR = "executor_plugin.executor.EdgeAgentExecutor"
START_TIMEOUT = 240.0
STOP_TIMEOUT = 60.0
_LISTENING = re.compile(r"gateway listening on https://127\.0\.0\.1:(\d+)")

_SERVE = (
    "from executor_plugin.gateway.server import serve\n"
    "from executor_plugin.settings import HostedSettings\n"
    "serve('127.0.0.1', 0, HostedSettings.from_airflow_conf())\n"
)


@dataclass
class Enrolled:
    """An agent registered through the gateway, with its key and certificate on disk."""

    identity: AgentIdentity
    key: Any
    cert_file: Path
    key_file: Path

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id


@dataclass
class Home:
    """A temporary AIRFLOW_HOME with its SQLite database, CA and environment."""

    path: Path
    env: dict[str, str]
    jwt_secret: str
    ca: CertificateAuthority
    sessions: sessionmaker

    @property
    def log_folder(self) -> Path:
        return self.path / "logs"

    def session(self) -> Session:
        return self.sessions()


@dataclass
class GatewayProcess:
    home: Home
    proc: subprocess.Popen
    port: int
    output: list[str] = field(default_factory=list)

    trust_domain = TRUST_DOMAIN
    executor = EXECUTOR

    @staticmethod
    def new_queue() -> str:
        return new_queue()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> CertificateAuthority:
        return self.home.ca

    def client(self, agent: Enrolled | None = None, *, timeout: float = 60.0, **kwargs: Any) -> httpx.Client:
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem)
        if agent is not None:
            ctx.load_cert_chain(str(agent.cert_file), str(agent.key_file))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=timeout, **kwargs)

    def mint_token(
        self, *, queues: list[str], name: str | None = None, ttl: timedelta = timedelta(hours=1), max_uses: int = 1
    ) -> RegistrationToken:
        token = RegistrationToken.mint(self.ca.pin)
        with self.home.session() as s:
            store.create_token(
                s, token_id=token.token_id, secret_hash=store.hash_secret(token.secret), queues=queues,
                region="it-1", name=name, ttl=ttl, max_uses=max_uses,
            )
            s.commit()
        return token

    def register(
        self, tmp_path: Path, *, token: RegistrationToken | None = None, queues: list[str] | None = None,
        key: Any = None, name: str | None = "it-agent",
    ) -> Enrolled:
        token = token or self.mint_token(queues=queues or [new_queue()])
        key = key or generate_key()
        with self.client() as c:
            r = c.post(
                REGISTER_PATH,
                json={"token": str(token), "csr_pem": make_csr(key, "ignored"), "name": name, "version": "it"},
            )
        assert r.status_code == 200, r.text
        identity = AgentIdentity.model_validate(r.json())
        folder = tmp_path / f"agent-{identity.agent_id}-{secrets.token_hex(3)}"
        folder.mkdir(mode=0o700)
        cert_file, key_file = folder / "agent.pem", folder / "agent.key"
        cert_file.write_text(identity.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return Enrolled(identity=identity, key=key, cert_file=cert_file, key_file=key_file)

    def enqueue(self, queue: str, *, task_id: str = "t", token: str = "scheduler-token", log_path: str | None = None) -> str:
        ti_id = str(uuid.uuid4())
        workload = {
            "type": "ExecuteTask",
            "token": token,
            "ti": {"id": ti_id, "dag_id": "d", "task_id": task_id, "run_id": "r", "try_number": 1, "map_index": -1},
            "dag_rel_path": "d.py",
            "bundle_info": {"name": "dags-folder", "version": None},
            "log_path": log_path if log_path is not None else f"dag_id=d/run_id=r/task_id={task_id}/attempt=1.log",
        }
        with self.home.session() as s:
            job_id = store.enqueue_job(
                s, workload_json=json.dumps(workload), ti_id=ti_id, dag_id="d", task_id=task_id, run_id="r",
                map_index=-1, try_number=1, queue=queue, priority_weight=1,
            )
            s.commit()
        return job_id

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code (kills only on a hang, and says so)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("gateway did not stop on SIGTERM:\n" + self.log_text())
        return self.proc.returncode

    def log_text(self) -> str:
        return "".join(self.output[-200:])


def new_queue() -> str:
    """A queue no other test uses, so tests sharing one gateway never lease each other's jobs."""
    return f"q_{uuid.uuid4().hex[:10]}"


def _make_home(path: Path) -> Home:
    path.mkdir(parents=True, exist_ok=True)
    db = path / "airflow.db"
    jwt_secret = secrets.token_hex(64)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(path),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{db}",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": EXECUTOR,
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(path / "logs"),
        "AIRFLOW__EDGE_AGENT__CA_DIR": str(path / "ca"),
        "AIRFLOW__EDGE_AGENT__TRUST_DOMAIN": TRUST_DOMAIN,
        "AIRFLOW__EDGE_AGENT__LEASE_POLL_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    engine = create_engine(f"sqlite:///{db}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _busy_timeout(conn, _record):  # the gateway writes the same file concurrently
        conn.execute("PRAGMA busy_timeout=10000")

    metadata.create_all(engine)
    ca, _ = CertificateAuthority.init(path / "ca")
    return Home(path=path, env=env, jwt_secret=jwt_secret, ca=ca, sessions=sessionmaker(bind=engine, expire_on_commit=False))


def _launch(home: Home) -> GatewayProcess:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE],
        env=home.env,
        cwd=home.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ready = threading.Event()
    port: list[int] = []

    def pump() -> None:
        # Drains the pipe for the whole life of the process, so the gateway never blocks on logging.
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            match = _LISTENING.search(line)
            if match and not port:
                port.append(int(match.group(1)))
                ready.set()
        ready.set()  # process ended: wake the waiter

    threading.Thread(target=pump, name="gateway-output", daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not port:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise AssertionError("gateway did not start:\n" + "".join(output[-100:]))
    return GatewayProcess(home=home, proc=proc, port=port[0], output=output)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway process shared by the session (startup imports Airflow: seconds, not millis)."""
    gw = _launch(_make_home(tmp_path_factory.mktemp("gateway-home")))
    yield gw
    code = gw.stop()
    assert code == 0, f"gateway exited with {code}:\n{gw.log_text()}"


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[[], GatewayProcess]]:
    """Start a private gateway (on its own home) that the test may stop; stopped at teardown."""
    started: list[GatewayProcess] = []

    def start() -> GatewayProcess:
        gw = _launch(_make_home(tmp_path / f"home{len(started)}"))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        if gw.proc.poll() is None:
            gw.stop()
