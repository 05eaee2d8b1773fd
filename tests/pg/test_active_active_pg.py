"""Active/active: two gateway processes on one PostgreSQL, many agents leasing at once, each job leased once.

Real parts throughout: a PostgreSQL cluster (``scripts/pgcluster.py``), ``airflow db migrate`` on it,
``airflow edge-agents ca init``, two ``airflow edge-agents gateway`` processes on two loopback ports
sharing the database and the CA, and agents registered through the project's own client
(:func:`edge_agent.identity.enroll.register`: pin check, local key, CSR) with real tokens, minted
through the store as ``airflow edge-agents token create`` does (that command has its own tests in
``tests/unit/test_admin_cli.py``; here it would only add three Airflow start-ups).
Each agent then long-polls through its own mTLS client (:class:`edge_agent.client.AgentAPI`), even
agents on gateway A and odd ones on gateway B, and reports every job it leases RUNNING then
SUCCESS, as ``edge-agent run`` would (the task itself is not run: leasing is what is under test).

Agents come in three groups by token: ``red`` only, ``green`` + ``blue``, and all three, so every
queue is served by agents of both gateways and some agents must never see some queues. Half the
jobs are queued before the agents start (a burst of concurrent lease attempts on a full table),
the other half while they poll (wake-ups across two processes).

Checked: every job was leased exactly once (counted from the clients' side), and the job table
agrees (each job ``success``, held by the agent that leased it, fencing 1: one lease, never
requeued); no lease outside the leasing agent's queues; no 5xx, no client error; both gateways
leased. The lease rate is printed (leases/s, each lease with its two state reports).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from edge_agent.client import AgentAPI
from edge_agent.errors import EdgeAgentError
from edge_agent.identity.enroll import register
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.protocol import JobReport, JobState, RegistrationToken
from edge_agent.transport import build_client
from executor_plugin import store
from executor_plugin.gateway.server import ServerCertificate, gateway_hosts
from executor_plugin.models import job_table
from executor_plugin.pki import CertificateAuthority
from hosted_pg import Gateway, HostedPg

N_AGENTS = 24
N_JOBS = 400
#: Queued before the agents start; the rest while they poll.
N_UPFRONT = N_JOBS // 2
ENQUEUE_BATCH = 20
GROUPS: tuple[tuple[str, ...], ...] = (("aa_red",), ("aa_green", "aa_blue"), ("aa_red", "aa_green", "aa_blue"))
QUEUES = ("aa_red", "aa_green", "aa_blue")
REGION = "aa-1"
#: Long-poll wait per lease request (seconds). Short enough that agents notice the end quickly.
LEASE_WAIT = 5.0
#: Bounds a hang of the whole leasing phase; not an expectation (it takes seconds).
LEASE_PHASE_TIMEOUT = 240.0
REGISTER_CONCURRENCY = 6
DAG_ID = "aa_dag"
RUN_ID = "aa_run"


@dataclass
class Agent:
    name: str
    identity: StoredIdentity
    gateway: Gateway
    api: AgentAPI | None = None
    leased: list[tuple[str, str]] = field(default_factory=list)  # (job id, queue)


@dataclass
class Deployment:
    hosted: HostedPg
    engine: Engine
    gateways: list[Gateway]
    agents: list[Agent]


@pytest.fixture(scope="module")
def deployment(pg_new_database: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = pg_new_database("active_active")
    hosted = HostedPg(tmp_path_factory.mktemp("aa-home"), url)
    engine = create_engine(url, pool_size=4, max_overflow=2)
    ready = False
    try:
        hosted.airflow("db", "migrate")
        ca_dir = Path(hosted.airflow_json("edge-agents", "ca", "init", "--json")["ca_dir"])
        ca = CertificateAuthority.load(ca_dir)
        # Two gateways starting at once on a fresh CA directory would both issue the shared server
        # certificate in <ca_dir>/gateway/, and one could load the other's key between the two
        # writes. Issue it once first, with the gateway's own code, as a first start would.
        ServerCertificate(ca, gateway_hosts("127.0.0.1")).ensure()
        # From this thread: a gateway's death signal follows the thread that forked it.
        gateways = hosted.start_gateways("a", "b")
        agents = _register_agents(hosted, gateways, _mint_tokens(engine, ca))
        ready = True
    except Exception as exc:
        raise AssertionError(f"setting up the active/active deployment failed: {exc}\n{hosted.log_tails()}") from exc
    finally:
        if not ready:
            hosted.stop()
            engine.dispose()
    try:
        yield Deployment(hosted=hosted, engine=engine, gateways=gateways, agents=agents)
    finally:
        codes = hosted.stop()
        engine.dispose()
    # A gateway that does not exit cleanly on SIGTERM is a finding of its own.
    assert all(code == 0 for code in codes.values()), f"gateway exit codes {codes}\n{hosted.log_tails()}"


def _mint_tokens(engine: Engine, ca: CertificateAuthority) -> list[str]:
    """One registration token per group, ``N_AGENTS`` uses each, as ``token create`` mints them."""
    tokens = []
    with Session(engine) as session, session.begin():
        for queues in GROUPS:
            token = RegistrationToken.mint(ca.pin)
            store.create_token(
                session, token_id=token.token_id, secret_hash=store.hash_secret(token.secret), queues=queues,
                region=REGION, name=None, ttl=timedelta(minutes=15), max_uses=N_AGENTS,
            )
            tokens.append(str(token))
    return tokens


def _register_agents(hosted: HostedPg, gateways: list[Gateway], tokens: list[str]) -> list[Agent]:
    def one(i: int) -> Agent:
        name = f"aa-agent-{i:02d}"
        gateway = gateways[i % 2]
        state_dir = hosted.home / "agents" / name
        # File backend: never touch the developer's keyring.
        identity = register(gateway.url, tokens[i % len(GROUPS)], name, Keystore(state_dir, backend="file"), "aa-test")
        return Agent(name=name, identity=identity, gateway=gateway)

    with ThreadPoolExecutor(REGISTER_CONCURRENCY) as pool:
        agents = list(pool.map(one, range(N_AGENTS)))
    for i, agent in enumerate(agents):
        assert sorted(agent.identity.queues) == sorted(GROUPS[i % len(GROUPS)]), agent
    return agents


def _workload(ti_id: str, task_id: str) -> str:
    return json.dumps(
        {
            "type": "ExecuteTask",
            "token": "scheduler-token",
            "ti": {"id": ti_id, "dag_id": DAG_ID, "task_id": task_id, "run_id": RUN_ID, "try_number": 1,
                   "map_index": -1},
            "dag_rel_path": "aa.py",
            "bundle_info": {"name": "dags-folder", "version": None},
            "log_path": f"dag_id={DAG_ID}/run_id={RUN_ID}/task_id={task_id}/attempt=1.log",
        }
    )


def _enqueue(engine: Engine, indices: range) -> dict[str, str]:
    """Queue jobs ``indices`` through the store (as the executor does); their queue by job id."""
    rng = random.Random(indices.start)
    queued: dict[str, str] = {}
    with Session(engine) as session:
        for i in indices:
            ti_id, task_id, queue = str(uuid.uuid4()), f"t{i:04d}", QUEUES[i % len(QUEUES)]
            job_id = store.enqueue_job(
                session, workload_json=_workload(ti_id, task_id), ti_id=ti_id, dag_id=DAG_ID, task_id=task_id,
                run_id=RUN_ID, map_index=-1, try_number=1, queue=queue, priority_weight=rng.randint(1, 3),
            )
            queued[job_id] = queue
            if (i + 1) % ENQUEUE_BATCH == 0:
                session.commit()
        session.commit()
    return queued


class Run:
    """Shared state of the leasing phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished = 0
        self.done = threading.Event()
        self.abort = threading.Event()
        self.errors: list[str] = []

    def fail(self, agent: Agent, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{agent.name} via gateway {agent.gateway.name}: {type(exc).__name__}: {exc}")
        self.abort.set()

    def job_finished(self) -> None:
        with self.lock:
            self.finished += 1
            if self.finished == N_JOBS:
                self.done.set()


def _agent_loop(agent: Agent, run: Run) -> None:
    """Lease until every job is done: each leased job is reported RUNNING, then SUCCESS."""
    assert agent.api is not None
    try:
        while not (run.done.is_set() or run.abort.is_set()):
            lease = agent.api.lease(free_slots=1, wait_seconds=LEASE_WAIT)
            if lease is None:
                continue
            agent.leased.append((lease.job_id, lease.queue))
            agent.api.report_state(lease.job_id, JobReport(fencing=lease.fencing, state=JobState.RUNNING))
            agent.api.report_state(
                lease.job_id, JobReport(fencing=lease.fencing, state=JobState.SUCCESS, exit_code=0)
            )
            run.job_finished()
    except (EdgeAgentError, OSError) as exc:
        run.fail(agent, exc)
    except BaseException as exc:  # anything else is a bug in the test or the client: report it
        run.fail(agent, exc)
        raise


def _job_rows(engine: Engine) -> dict[str, dict]:
    j = job_table.c
    with engine.connect() as conn:
        rows = conn.execute(select(j.id, j.queue, j.state, j.agent_id, j.fencing).where(j.dag_id == DAG_ID))
        return {row.id: row._asdict() for row in rows}


def _lease_all(engine: Engine, agents: list[Agent]) -> tuple[Run, dict[str, str], float]:
    """Queue the jobs and let every agent lease until all are done; (run, queue by job id, seconds)."""
    queued = _enqueue(engine, range(N_UPFRONT))
    run = Run()
    for agent in agents:
        agent.api = AgentAPI(build_client(agent.gateway.url, agent.identity, timeout=60.0))
    threads = [threading.Thread(target=_agent_loop, args=(a, run), name=a.name, daemon=True) for a in agents]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        queued.update(_enqueue(engine, range(N_UPFRONT, N_JOBS)))  # while the agents poll
        run.done.wait(LEASE_PHASE_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        run.abort.set()  # the others stop after their current poll, done or not
        for thread in threads:
            thread.join(LEASE_WAIT + 60)
        for agent in agents:
            if agent.api is not None:
                agent.api.close()
    if any(t.is_alive() for t in threads):
        run.errors.append("an agent thread did not end")
    return run, queued, elapsed


def _verify(deployment: Deployment, run: Run, queued: dict[str, str]) -> dict[str, object]:
    """Every assertion of the test; returns figures for the report line."""
    agents = deployment.agents
    assert not run.errors, "agents failed:\n" + "\n".join(run.errors[:20])
    assert run.done.is_set(), f"only {run.finished}/{N_JOBS} jobs were done within {LEASE_PHASE_TIMEOUT:.0f}s"

    # --- the clients' view: every job leased exactly once, only from the agent's own queues -------
    leases = Counter(job_id for agent in agents for job_id, _ in agent.leased)
    twice = {job_id: n for job_id, n in leases.items() if n > 1}
    assert not twice, f"jobs leased more than once: {twice}"
    assert set(leases) == set(queued), (
        f"leased but never queued: {set(leases) - set(queued)}; queued but never leased: {set(queued) - set(leases)}"
    )
    holder: dict[str, Agent] = {}
    for agent in agents:
        for job_id, queue in agent.leased:
            holder[job_id] = agent
            assert queue == queued[job_id], (job_id, queue, queued[job_id])
            assert queue in agent.identity.queues, f"{agent.name} ({agent.identity.queues}) leased a {queue} job"

    # --- the database's view: one holder each, one lease each (fencing 1), all done ----------------
    rows = _job_rows(deployment.engine)
    assert set(rows) == set(queued)
    for job_id, row in rows.items():
        assert row["state"] == "success", row
        assert row["agent_id"] == holder[job_id].identity.agent_id, row
        # Fencing is bumped by every lease and every requeue: 1 means leased once and never moved.
        assert row["fencing"] == 1, row
        assert row["queue"] in holder[job_id].identity.queues, row

    # --- the gateways' view: both leased, nothing answered 5xx -------------------------------------
    per_gateway = Counter(agent.gateway.name for agent in agents for _ in agent.leased)
    assert set(per_gateway) == {"a", "b"}, per_gateway
    statuses = {g.name: g.statuses() for g in deployment.gateways}
    server_errors = {
        name: {path: [c for c in codes if c >= 500] for path, codes in by_path.items() if any(c >= 500 for c in codes)}
        for name, by_path in statuses.items()
    }
    assert not any(server_errors.values()), f"5xx answers: {server_errors}"
    per_agent = [len(agent.leased) for agent in agents]
    return {
        "leases per gateway": dict(per_gateway),
        "lease requests per gateway": {n: len(b.get("/agents/v1/lease", [])) for n, b in statuses.items()},
        "jobs per agent (min, max)": (min(per_agent), max(per_agent)),
    }


def test_two_gateways_lease_every_job_exactly_once(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    run, queued, elapsed = _lease_all(deployment.engine, deployment.agents)
    try:
        figures = _verify(deployment, run, queued)
    except AssertionError as exc:
        states = Counter(r["state"] for r in _job_rows(deployment.engine).values())
        raise AssertionError(
            f"{exc}\njob states: {dict(states)}; done {run.finished}/{N_JOBS}\n{deployment.hosted.log_tails()}"
        ) from None
    rate = N_JOBS / elapsed
    record_property("leases_per_second", round(rate, 1))
    with capsys.disabled():  # the figure is the point of the run: show it even when output is captured
        print(
            f"\nactive/active on PostgreSQL: {N_JOBS} jobs, {N_AGENTS} agents, 2 gateways: {rate:.1f} leases/s "
            f"({elapsed:.1f} s, each lease followed by its RUNNING and SUCCESS reports); duplicates 0; "
            + "; ".join(f"{k} {v}" for k, v in figures.items())
        )
