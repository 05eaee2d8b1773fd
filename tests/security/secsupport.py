"""Helpers of the security suite: what an attacker presents, and snapshots of what an attack must
not change.

Every attack test takes a snapshot of the rows and files the attack aims at, makes the attempt,
asserts the refusal, then asserts the snapshot is identical: a refusal that still changed state
(a token use spent, a job leased, a log line written, a task instance started) is a failure.

The gateway fixture is ``tests/integration/conftest.py``'s real gateway subprocess over real TLS,
started on a home whose SQLite file also holds Airflow's own tables (``airflow db migrate``), so
Execution API attacks can show that Airflow's task instance row did not move.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, insert, select

from edge_agent.protocol import LEASE_PATH, Lease, LeaseResponse, RegistrationToken
from executor_plugin import store
from executor_plugin.models import agent_table, job_table, token_table
from executor_plugin.pki import CertificateAuthority, spiffe_id

#: Upper bound for "takes effect within seconds" (revocation, policy changes). Generous: the machine
#: is shared, and only the bound is asserted, never a duration.
EFFECT_WITHIN_SECONDS = 10.0


# ---------------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------------


def _row(gw: Any, table: Any, key: str) -> dict[str, Any] | None:
    with gw.home.session() as s:
        row = s.execute(select(table).where(table.c.id == key)).first()
    return dict(row._mapping) if row is not None else None


def job_row(gw: Any, job_id: str) -> dict[str, Any]:
    row = _row(gw, job_table, job_id)
    assert row is not None, f"job {job_id} vanished"
    return row


def agent_row(gw: Any, agent_id: str) -> dict[str, Any] | None:
    return _row(gw, agent_table, agent_id)


def token_row(gw: Any, token_id: str) -> dict[str, Any] | None:
    return _row(gw, token_table, token_id)


def agents_of_token(gw: Any, token_id: str) -> list[dict[str, Any]]:
    with gw.home.session() as s:
        rows = s.execute(select(agent_table).where(agent_table.c.token_id == token_id)).all()
    return [dict(r._mapping) for r in rows]


def agent_count(gw: Any) -> int:
    with gw.home.session() as s:
        return s.execute(select(func.count()).select_from(agent_table)).scalar_one()


def token_count(gw: Any) -> int:
    with gw.home.session() as s:
        return s.execute(select(func.count()).select_from(token_table)).scalar_one()


def log_tree(gw: Any) -> dict[str, int]:
    """Every file under the hosted log folder, with its size."""
    root = gw.home.log_folder
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Tokens, agents, jobs
# ---------------------------------------------------------------------------------------------------


def mint_token(
    gw: Any,
    *,
    queues: list[str],
    region: str = "it-1",
    ttl: timedelta = timedelta(hours=1),
    max_uses: int = 1,
) -> RegistrationToken:
    """A token written straight into the store (as one minted before a queue policy existed)."""
    token = RegistrationToken.mint(gw.ca.pin)
    with gw.home.session() as s:
        store.create_token(
            s, token_id=token.token_id, secret_hash=store.hash_secret(token.secret), queues=queues,
            region=region, name=None, ttl=ttl, max_uses=max_uses,
        )
        s.commit()
    return token


def enroll(gw: Any, tmp_path: Path, *, queues: list[str] | None = None, region: str = "it-1") -> Any:
    """Register an agent through the real register route, for ``queues`` in ``region``."""
    token = mint_token(gw, queues=queues or [gw.new_queue()], region=region)
    return gw.register(tmp_path, token=token)


def lease(gw: Any, agent: Any, *, wait_seconds: float = 0.5, client: httpx.Client | None = None) -> Lease | None:
    own = client is None
    c = client or gw.client(agent)
    try:
        r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": wait_seconds})
    finally:
        if own:
            c.close()
    assert r.status_code == 200, r.text
    return LeaseResponse.model_validate(r.json()).lease


def lease_job(gw: Any, agent: Any, job_id: str) -> Lease:
    got = lease(gw, agent, wait_seconds=30)
    assert got is not None and got.job_id == job_id, got
    return got


class HeldPoll:
    """A lease request in a thread; ``sent`` is set once its body has gone out on the wire."""

    def __init__(self, client: httpx.Client, wait_seconds: float) -> None:
        self.sent = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def trace(name: str, _info: dict) -> None:
            if name == "http11.send_request_body.complete":
                self.sent.set()

        def run() -> None:
            try:
                self.response = client.post(
                    LEASE_PATH, json={"free_slots": 1, "wait_seconds": wait_seconds}, extensions={"trace": trace}
                )
            except BaseException as exc:  # reported by the test
                self.error = exc
            finally:
                self.sent.set()

        self.thread = threading.Thread(target=run, name="held-poll", daemon=True)
        self.thread.start()


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

BIN = Path(sys.executable).parent


def airflow_cli(gw: Any, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``airflow edge-agents ARGS`` on the gateway's home, as an operator would run it."""
    return subprocess.run(
        [str(BIN / "airflow"), "edge-agents", *args],
        env=gw.home.env, cwd=gw.home.path, capture_output=True, text=True, timeout=timeout,
    )


def edge_agent_cli(
    *args: str, stdin: str | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``edge-agent`` command, with no Airflow environment and file-backed secrets."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EDGE_AGENT"))}
    clean["EDGE_AGENT_SECRET_BACKEND"] = "file"
    clean.update(env or {})
    return subprocess.run(
        [str(BIN / "edge-agent"), *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=clean
    )


# ---------------------------------------------------------------------------------------------------
# Certificates an attacker would present
# ---------------------------------------------------------------------------------------------------


def write_identity(folder: Path, key: ec.EllipticCurvePrivateKey, cert_pem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag = secrets.token_hex(3)
    cert_file, key_file = folder / f"cert-{tag}.pem", folder / f"key-{tag}.pem"
    cert_file.write_text(cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def client_with(gw: Any, cert_file: Path, key_file: Path, *, timeout: float = 30.0) -> httpx.Client:
    ctx = ssl.create_default_context(cadata=gw.ca.cert_pem)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return httpx.Client(base_url=gw.url, verify=ctx, timeout=timeout)


def agent_cert_signed_by(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name,
    subject_key: ec.EllipticCurvePrivateKey,
    *,
    agent_id: str,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
) -> str:
    """A client certificate shaped exactly like ours (SPIFFE URI SAN, clientAuth), any validity."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
        .issuer_name(issuer_name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(trust_domain, agent_id))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def expired_agent_cert(
    ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey, *, agent_id: str, trust_domain: str
) -> str:
    """Issued by our own CA for a real agent id, but its notAfter is a day in the past."""
    now = datetime.now(timezone.utc)
    return agent_cert_signed_by(
        ca.key, ca.cert.subject, key, agent_id=agent_id, trust_domain=trust_domain,
        not_before=now - timedelta(days=2), not_after=now - timedelta(days=1),
    )


# ---------------------------------------------------------------------------------------------------
# Airflow's own rows (for Execution API attacks)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInstanceRef:
    id: str
    dag_id: str
    run_id: str
    task_id: str


def migrate_airflow_db(env: dict[str, str], cwd: Path) -> None:
    """``airflow db migrate`` on the home's SQLite file: Airflow's tables next to ours."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def add_queued_task_instance(gw: Any, *, queue: str, dag_prefix: str = "sec") -> TaskInstanceRef:
    """A DAG, a run and one QUEUED task instance in Airflow's tables (as the scheduler leaves them)."""
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    dag_id = f"{dag_prefix}_{uuid.uuid4().hex[:8]}"
    run_id = "manual__sec"
    ref = TaskInstanceRef(id=str(uuid.uuid4()), dag_id=dag_id, run_id=run_id, task_id="t")
    now = datetime.now(timezone.utc)
    with gw.home.session() as s:
        bundles = DagBundleModel.__table__
        if s.execute(select(bundles.c.name).where(bundles.c.name == "dags-folder")).first() is None:
            s.execute(insert(bundles).values(name="dags-folder", active=True))
        s.execute(
            insert(DagModel.__table__).values(
                dag_id=dag_id, bundle_name="dags-folder", is_paused=False, is_stale=False,
                max_active_tasks=16, max_consecutive_failed_dag_runs=0, has_task_concurrency_limits=False,
            )
        )
        s.execute(
            insert(DagRun.__table__).values(
                dag_id=dag_id, run_id=run_id, run_type="manual", state="running", run_after=now,
                logical_date=now, start_date=now, clear_number=0, conf=None,
            )
        )
        s.execute(
            insert(TaskInstance.__table__).values(
                id=uuid.UUID(ref.id), dag_id=dag_id, run_id=run_id, task_id="t", map_index=-1, try_number=1,
                max_tries=0,
                state="queued", pool="default_pool", pool_slots=1, queue=queue, priority_weight=1,
                queued_dttm=now, executor=gw.executor,
            )
        )
        s.commit()
    return ref


def task_instance_row(gw: Any, ti_id: str) -> dict[str, Any]:
    from airflow.models.taskinstance import TaskInstance

    table = TaskInstance.__table__
    with gw.home.session() as s:
        row = s.execute(select(table).where(table.c.id == uuid.UUID(ti_id))).one()
    return dict(row._mapping)


def enqueue_for(gw: Any, ti: TaskInstanceRef, queue: str) -> str:
    """Our job row for ``ti``, as ``EdgeAgentExecutor.queue_workload`` writes it."""
    workload = {
        "type": "ExecuteTask",
        "token": "scheduler-token",
        "ti": {
            "id": ti.id, "dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "try_number": 1,
            "map_index": -1,
        },
        "dag_rel_path": "d.py",
        "bundle_info": {"name": "dags-folder", "version": None},
        "log_path": f"dag_id={ti.dag_id}/run_id={ti.run_id}/task_id={ti.task_id}/attempt=1.log",
    }
    with gw.home.session() as s:
        job_id = store.enqueue_job(
            s, workload_json=json.dumps(workload), ti_id=ti.id, dag_id=ti.dag_id, task_id=ti.task_id,
            run_id=ti.run_id, map_index=-1, try_number=1, queue=queue, priority_weight=1,
        )
        s.commit()
    return job_id


def run_payload(pid: int = 4242) -> dict[str, Any]:
    """The body of the Task SDK's ``PATCH /execution/task-instances/{id}/run``."""
    return {
        "state": "running",
        "hostname": "sec-host",
        "unixname": "sec",
        "pid": pid,
        "start_date": datetime.now(timezone.utc).isoformat(),
    }
