"""The benchmark's deployment: ``scripts/localstack.py``'s stack on PostgreSQL (or SQLite), with the
executor under test given the same number of slots, plus edge3's worker when the provider is installed.

:class:`BenchStack` only changes what the stack launcher leaves open: the database URL, the
executor list, ``[core] parallelism`` (LocalExecutor's slots), and edge3's settings. It adds
:meth:`BenchStack.start_edge3_worker` and helpers to find components and count access-log lines.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from localstack import _BIN, Component, LocalStack, StackError

from bench import edge3_env

#: The agent's queue in the benchmark DAGs (``bench/dags/bench_dags.py``).
AGENT_QUEUE = "bench"
AGENT_REGION = "bench-1"
AGENT_NAME = "bench-agent"
EDGE3_READY_TIMEOUT = 180.0

# One HTTP request as the gateway (uvicorn's access log: '"POST /path HTTP/1.1" 200') and the
# api-server (Airflow's HttpAccessLogMiddleware: 'method=POST path=/path') print it.
_METHODS = rb"(?:GET|POST|PUT|PATCH|DELETE|HEAD)"
_REQUEST = re.compile(rb'"' + _METHODS + rb' (/[^ "?]*)|method=' + _METHODS + rb' path=(/[^ ?]*)')


class BenchStack(LocalStack):
    """A :class:`LocalStack` whose executors all get ``concurrency`` slots, on the given database."""

    def __init__(
        self,
        home: Path,
        dags: Path,
        *,
        concurrency: int,
        db_url: str | None = None,
        db_async_url: str | None = None,
        edge3: bool = False,
        local: bool = True,
        scheduler_parallelism: int | None = None,
        dag_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(home, dags)
        self.concurrency = concurrency
        self.db_url = db_url
        self.db_async_url = db_async_url
        self.edge3 = edge3
        self.local = local
        self.scheduler_parallelism = scheduler_parallelism or concurrency
        self.dag_env = dict(dag_env or {})
        self.edge3_worker: Component | None = None

    # ---- configuration --------------------------------------------------------------------------

    def _hosted_env(self) -> dict[str, str]:
        env = super()._hosted_env()
        executors = (["LocalExecutor"] if self.local else []) + ["executor_plugin.EdgeAgentExecutor"]
        if self.edge3:
            executors.append(edge3_env.EXECUTOR_PATH)
            env.update(edge3_env.hosted_env(self.api_url))
        env["AIRFLOW__CORE__EXECUTOR"] = ",".join(executors)
        # LocalExecutor's slots (it forks this many workers at start); every other executor here
        # is given the same number of slots (agent --concurrency, edge worker -c). It is also what
        # EdgeAgentExecutor and EdgeExecutor count their queued + running tasks against: a larger
        # value (an experiment, without LocalExecutor) lets the scheduler queue ahead of free slots.
        env["AIRFLOW__CORE__PARALLELISM"] = str(self.scheduler_parallelism)
        env["AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG"] = "1000"
        if self.db_url:
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = self.db_url
            if self.db_async_url:
                env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = self.db_async_url
        env.update(self.dag_env)
        return env

    # ---- components -----------------------------------------------------------------------------

    def component(self, name: str) -> Component:
        for comp in [*self.components, *self.agents]:
            if comp.name == name:
                return comp
        raise StackError(f"no component named {name!r}")

    def start_bench_agent(self) -> Any:
        return self.start_agent(
            AGENT_NAME, [AGENT_QUEUE], AGENT_REGION, concurrency=self.concurrency, extra_env=self.dag_env
        )

    def start_edge3_worker(self) -> Component:
        """Start ``airflow edge worker`` and wait until the api-server lists it as idle."""
        if not self.edge3:
            raise StackError("edge3 is not enabled in this stack")
        comp = self._spawn("edge3-worker", edge3_env.worker_argv(str(_BIN / "airflow"), self.concurrency))
        self.edge3_worker = comp

        def ready() -> bool | None:
            reply = self.api.get("/edge_worker/ui/worker")
            if reply.status_code != 200:
                return None
            states = {w["worker_name"]: w["state"] for w in reply.json().get("workers", [])}
            return True if states.get(edge3_env.WORKER_NAME) in ("idle", "running") else None

        self._wait.until("the edge3 worker to register", ready, EDGE3_READY_TIMEOUT, [comp], self._ctx)
        return comp

    def stop_components(self, names: list[str]) -> None:
        """Stop some components (by name) in parallel; the rest keep running."""
        comps = [c for c in [*self.agents, *self.components] if c.name in names]
        threads = [threading.Thread(target=c.stop, daemon=True) for c in comps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # ---- our job table on PostgreSQL (LocalStack reads SQLite) ----------------------------------

    def _db_rows(self, sql: str, params: Any) -> list[dict[str, Any]]:
        if not self.db_url:
            return super()._db_rows(sql, params)
        import psycopg
        from psycopg.rows import dict_row

        dsn = self.db_url.replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            with psycopg.connect(dsn, connect_timeout=30, row_factory=dict_row) as conn:
                return list(conn.execute(sql.replace("?", "%s"), params).fetchall())
        except psycopg.errors.UndefinedTable:
            return []


class AccessLog:
    """Counts HTTP requests in a component's log between two moments (byte offsets)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def mark(self) -> None:
        self.start = self._size()

    def count(self, prefixes: tuple[str, ...]) -> dict[str, int]:
        """Requests since :meth:`mark` whose path starts with one of ``prefixes``, by prefix."""
        with self.path.open("rb") as handle:
            handle.seek(self.start)
            data = handle.read()
        counts = dict.fromkeys(prefixes, 0)
        for line in data.splitlines():
            match = _REQUEST.search(line)
            if not match:
                continue
            path = (match.group(1) or match.group(2)).decode("latin-1")
            for prefix in prefixes:
                if path.startswith(prefix):
                    counts[prefix] += 1
                    break
        return counts


__all__ = ["AGENT_NAME", "AGENT_QUEUE", "AGENT_REGION", "AccessLog", "BenchStack"]
