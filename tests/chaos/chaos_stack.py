"""The chaos suite's deployment: two schedulers, two gateways and two agents behind loopback proxies, on PostgreSQL.

:class:`ChaosStack` is ``bench/stack.py``'s :class:`BenchStack` (``scripts/localstack.py`` on
PostgreSQL) with the extra processes and the settings that make failures resolve within a test:

* hosted: api-server, dag-processor, triggerer, ``scheduler`` and ``scheduler-2``, ``gateway`` and
  ``gateway-2`` (active/active on one database); EdgeAgentExecutor is the only executor.
* agents: ``chaos-a`` reaches ``gateway`` only through :attr:`ChaosStack.proxy_a`, ``chaos-b``
  reaches ``gateway-2`` only through :attr:`ChaosStack.proxy_b` (``scripts/tcpproxy.py``). Each
  registered through its proxy's URL, so every byte it sends passes the proxy.
* the agents get ``$CHAOS_LEDGER`` (the DAG's append-only ledger, see ``dags/chaos_dag.py``) and
  ``$CHAOS_AGENT`` (their name).

It also knows how to hurt and heal its parts (``kill9``, ``restart``, ``restart_agent``) and reads
the raw evidence the checks need (:meth:`evidence`): Airflow's task instances and their history, our
job rows, the ledger and the agents' audit logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from localstack import _BIN, AgentProcess, Component, StackError, free_port

from bench.stack import BenchStack
from edge_agent.observability.status import STATUS_FILE, read_status

T = TypeVar("T")

CHAOS_DAGS = Path(__file__).resolve().parent / "dags"
# Keep in step with dags/chaos_dag.py (not imported: that file belongs to the DAG bundle).
DAG_ID = "chaos"
QUEUE = "chaos"
LEDGER_ENV = "CHAOS_LEDGER"
MARKER_ENV = "CHAOS_AGENT"
TASKS_ENV = "CHAOS_TASKS"
RETRIES = 3

REGION = "chaos-1"
AGENT_A = "chaos-a"
AGENT_B = "chaos-b"
AGENT_CONCURRENCY = 6

#: [scheduler] task_instance_heartbeat_timeout: how long Airflow waits for a running task's
#: heartbeat before it fails the try (default 300 s, far beyond a test). The gateway outage of
#: the gateway test (10 s down + the restart) must stay well inside it, the 60 s partition well
#: beyond it.
TASK_HEARTBEAT_TIMEOUT = 30
#: [edge_agent] agent_dead_after_seconds (default 30).
AGENT_DEAD_AFTER = 15
#: [scheduler] scheduler_health_check_threshold: after this a stopped scheduler's tasks are
#: orphans the other one adopts. Not shorter: a scheduler starved of CPU on this 2-core box must
#: not pass for dead while it is alive.
SCHEDULER_HEALTH_THRESHOLD = 20
#: [scheduler] orphaned_tasks_check_interval (default 300 s).
ORPHAN_CHECK_INTERVAL = 10

READY_TIMEOUT = 180.0


@dataclass(frozen=True)
class Evidence:
    """Everything the checks read about one DAG run, taken at one moment after it ended."""

    run_id: str
    run_state: str
    tis: list[dict[str, Any]]  # task_instance rows: task_id, map_index, try_number, state, ...
    history: list[dict[str, Any]]  # task_instance_history rows (earlier tries)
    jobs: list[dict[str, Any]]  # edge_agent_job rows
    ledger: list[dict[str, Any]]  # the DAG's own start/end lines for this run
    audit: dict[str, list[dict[str, Any]]]  # agent name -> its audit entries about this run
    agent_names: dict[str, str]  # agent id -> name


def utcnow() -> datetime:
    return datetime.now(UTC)


class ChaosStack(BenchStack):
    """The chaos deployment; :meth:`start` then :meth:`start_agents`; :meth:`stop` ends everything."""

    def __init__(
        self, home: Path, *, db_url: str, db_async_url: str, ledger: Path, tasks: int = 200
    ) -> None:
        super().__init__(
            home, CHAOS_DAGS, concurrency=AGENT_CONCURRENCY, db_url=db_url, db_async_url=db_async_url,
            local=False,
            # Each scheduler may keep as many jobs queued or running as both agents have slots.
            scheduler_parallelism=2 * AGENT_CONCURRENCY,
            dag_env={TASKS_ENV: str(tasks)},
        )
        self.tasks = tasks
        self.ledger = ledger.resolve()
        self.gateway2_port = free_port()
        self.gateway2_url = f"https://127.0.0.1:{self.gateway2_port}"
        self.proxy_a: Any = None
        self.proxy_b: Any = None
        self._proxies: list[Any] = []

    # ---- configuration --------------------------------------------------------------------------

    def _hosted_env(self) -> dict[str, str]:
        env = super()._hosted_env()
        env.update(
            {
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(TASK_HEARTBEAT_TIMEOUT),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": str(ORPHAN_CHECK_INTERVAL),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": str(SCHEDULER_HEALTH_THRESHOLD),
                "AIRFLOW__EDGE_AGENT__AGENT_DEAD_AFTER_SECONDS": str(AGENT_DEAD_AFTER),
            }
        )
        return env

    def _more_hosted(self) -> list[Component]:
        return [
            self._spawn("scheduler-2", [str(_BIN / "airflow"), "scheduler", "--skip-serve-logs"]),
            self._spawn("gateway-2", self._gateway_argv(self.gateway2_port)),
        ]

    @staticmethod
    def _gateway_argv(port: int) -> list[str]:
        return [str(_BIN / "airflow"), "edge-agents", "gateway", "--host", "127.0.0.1", "--port", str(port)]

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        try:
            self.wait_gateway(self.gateway2_port)
            self._wait.until("two schedulers heartbeating", self._two_schedulers, READY_TIMEOUT,
                             self.components, self._ctx)
        except BaseException:
            self.stop()
            raise

    def start_agents(self) -> None:
        """A proxy per gateway, an agent per proxy; returns when both agents lease."""
        from tcpproxy import TcpProxy  # scripts/tcpproxy.py

        self.proxy_a = TcpProxy(self.gateway_port).start()
        self._proxies.append(self.proxy_a)
        self.proxy_b = TcpProxy(self.gateway2_port).start()
        self._proxies.append(self.proxy_b)
        # One after the other, from this thread: the agents get SIGTERM when the thread that
        # started them ends (PR_SET_PDEATHSIG follows the thread, not the process).
        for name, proxy in ((AGENT_A, self.proxy_a), (AGENT_B, self.proxy_b)):
            self.start_agent(
                name, [QUEUE], REGION, concurrency=AGENT_CONCURRENCY,
                extra_env={LEDGER_ENV: str(self.ledger), MARKER_ENV: name, TASKS_ENV: str(self.tasks)},
                gateway_url=f"https://127.0.0.1:{proxy.port}",
            )

    def stop(self) -> None:
        """Heal the proxies (a partitioned agent could not report while it drains), stop all, then them."""
        for proxy in self._proxies:
            try:
                proxy.heal()
            except Exception:  # noqa: BLE001, S110 - a proxy that cannot heal must not keep the rest running
                pass
        try:
            super().stop()
        finally:
            for proxy in self._proxies:
                try:
                    proxy.stop()
                except Exception:  # noqa: BLE001, S110 - teardown goes on; the proxy thread is a daemon
                    pass

    # ---- finding parts --------------------------------------------------------------------------

    def agent(self, name: str) -> AgentProcess:
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise StackError(f"no agent named {name!r}")

    def wait_until(
        self, what: str, check: Callable[[], T | None], timeout: float, watch: Sequence[Component] | None = None
    ) -> T:
        """Repeat ``check`` (growing pauses, at most 2 s) until it returns a value; fail with the logs."""
        everything = [*self.components, *self.agents]
        return self._wait.until(what, check, timeout, everything if watch is None else watch, self._ctx)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the stack is stopping (a fault's planned duration)."""
        if self._stopping.wait(seconds):
            raise StackError("stack is stopping")

    # ---- faults and repairs ---------------------------------------------------------------------

    @staticmethod
    def kill9(comp: Component) -> None:
        """``kill -9`` of the component's own process (not its group), and reap it."""
        try:
            os.kill(comp.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        comp.proc.wait(timeout=30)

    def wait_group_gone(self, comp: Component, timeout: float) -> bool:
        """Wait until no process of the component's group is left; False if some still are then."""

        def gone() -> bool | None:
            try:
                os.killpg(comp.proc.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return None
            return None

        try:
            return self._wait.until(f"{comp.name}'s process group to end", gone, timeout, ())
        except StackError:
            return False

    def restart(self, name: str) -> Component:
        """Start a stopped hosted component again (same argv: same port, same config)."""
        comp = self.component(name)
        new = self.respawn(comp)
        if name.startswith("gateway"):
            self.wait_gateway(self.gateway_port if name == "gateway" else self.gateway2_port, [new])
        return new

    def restart_agent(self, name: str) -> AgentProcess:
        """Start a stopped agent again with its state dir; return once its gateway accepts heartbeats."""
        old = self.agent(name)
        since = utcnow()
        new = self.respawn(old)
        assert isinstance(new, AgentProcess)
        self.wait_until(f"agent {name} to run again", lambda: self._agent_back(new, since), READY_TIMEOUT, [new])
        return new

    def _agent_back(self, agent: AgentProcess, since: datetime) -> bool | None:
        status = self.agent_status(agent) or {}
        if status.get("pid") != agent.proc.pid or status.get("state") != "running":
            return None
        seen = self.agent_last_heartbeat(agent.agent_id)
        return True if seen is not None and seen > since else None

    def wait_gateway(self, port: int, watch: Sequence[Component] | None = None) -> None:
        def ok() -> bool | None:
            reply = httpx.get(
                f"https://127.0.0.1:{port}/agents/v1/trust-bundle", verify=self.tls_context(), timeout=10
            )
            return True if reply.status_code == 200 else None

        self.wait_until(f"gateway on port {port}", ok, READY_TIMEOUT, watch)

    # ---- what the agents say --------------------------------------------------------------------

    @staticmethod
    def agent_status(agent: AgentProcess) -> dict[str, Any] | None:
        """The agent's status file (not ``edge-agent status``: that probes the gateway, which may be cut off)."""
        return read_status(agent.state_dir / STATUS_FILE)

    @staticmethod
    def audit_entries(agent: AgentProcess) -> list[dict[str, Any]]:
        path = agent.state_dir / "audit.log"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a torn line after a kill -9; the agent records a chain_break for it
        return entries

    def ledger_lines(self, run_id: str) -> list[dict[str, Any]]:
        try:
            text = self.ledger.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("run") == run_id:
                rows.append(row)
        return rows

    # ---- the database ---------------------------------------------------------------------------

    def _two_schedulers(self) -> bool | None:
        rows = self._db_rows(
            "SELECT count(*) AS n FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"
            " AND latest_heartbeat > now() - make_interval(secs => ?)",
            (float(SCHEDULER_HEALTH_THRESHOLD),),
        )
        return True if rows and rows[0]["n"] >= 2 else None

    def scheduler_started_since(self, since: datetime) -> bool | None:
        """A scheduler started after ``since`` is running and has heartbeated."""
        rows = self._db_rows(
            "SELECT count(*) AS n FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"
            " AND start_date > ? AND latest_heartbeat > start_date",
            (since,),
        )
        return True if rows and rows[0]["n"] >= 1 else None

    def run_duration(self, run_id: str) -> float | None:
        """Seconds from the run's start to its end as Airflow recorded them; None while it runs."""
        rows = self._db_rows(
            "SELECT start_date, end_date, state FROM dag_run WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
        )
        if not rows or rows[0]["state"] not in ("success", "failed") or not rows[0]["end_date"]:
            return None
        return round((rows[0]["end_date"] - rows[0]["start_date"]).total_seconds(), 1)

    def agent_last_heartbeat(self, agent_id: str) -> datetime | None:
        rows = self._db_rows("SELECT last_heartbeat FROM edge_agent_agent WHERE id = ?", (agent_id,))
        return rows[0]["last_heartbeat"] if rows else None

    def job_rows(self, run_id: str) -> list[dict[str, Any]]:
        return self._db_rows(
            "SELECT id, task_id, map_index, try_number, state, agent_id, fencing, exit_code, reason,"
            " reported_state, queued_at, leased_at, started_at, finished_at"
            " FROM edge_agent_job WHERE dag_id = ? AND run_id = ? ORDER BY queued_at",
            (DAG_ID, run_id),
        )

    def ti_rows(self, run_id: str) -> list[dict[str, Any]]:
        return self._db_rows(
            "SELECT task_id, map_index, try_number, state, hostname, start_date, end_date, queued_by_job_id"
            " FROM task_instance WHERE dag_id = ? AND run_id = ? ORDER BY task_id, map_index",
            (DAG_ID, run_id),
        )

    def ti_history(self, run_id: str) -> list[dict[str, Any]]:
        return self._db_rows(
            "SELECT task_id, map_index, try_number, state, hostname, start_date, end_date"
            " FROM task_instance_history WHERE dag_id = ? AND run_id = ? ORDER BY task_id, map_index, try_number",
            (DAG_ID, run_id),
        )

    def evidence(self, run_id: str) -> Evidence:
        names = self.agent_names()
        audit: dict[str, list[dict[str, Any]]] = {}
        for agent in self.agents:
            audit[agent.name] = [
                e for e in self.audit_entries(agent) if (e.get("ti") or {}).get("run_id") == run_id
            ]
        return Evidence(
            run_id=run_id,
            run_state=self.run_state(DAG_ID, run_id),
            tis=self.ti_rows(run_id),
            history=self.ti_history(run_id),
            jobs=self.job_rows(run_id),
            ledger=self.ledger_lines(run_id),
            audit=audit,
            agent_names=names,
        )

    # ---- runs -----------------------------------------------------------------------------------

    def abandon_unfinished_runs(self) -> list[str]:
        """Mark any chaos run still going as failed (a test that broke off left it); return their ids."""
        reply = self._rest("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})
        left = [r["dag_run_id"] for r in reply.json()["dag_runs"] if r["state"] not in ("success", "failed")]
        for run_id in left:
            self.set_run_state(DAG_ID, run_id, "failed")
        return left

    def describe(self) -> str:
        """The agents' status files and every log tail, for a failure message (the harness adds the run)."""
        parts = []
        for agent in self.agents:
            parts.append(f"--- status file of {agent.name} ---\n{json.dumps(self.agent_status(agent), indent=1)}")
        parts.append(self.log_tails(60))
        return "\n".join(parts)

    def agent_jobs(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        # describe_run's job listing: ours has the exit code and fencing too.
        return self.job_rows(run_id)


def ensure_stopped(comp: Component, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
    """Signal the component's own process and wait for it to exit; its exit code (None if it hung)."""
    try:
        os.kill(comp.proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return comp.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


__all__ = [
    "AGENT_A",
    "AGENT_B",
    "AGENT_CONCURRENCY",
    "AGENT_DEAD_AFTER",
    "DAG_ID",
    "RETRIES",
    "TASK_HEARTBEAT_TIMEOUT",
    "ChaosStack",
    "Evidence",
    "ensure_stopped",
    "utcnow",
]
