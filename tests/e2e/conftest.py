"""Fixtures of the e2e suite: one real local stack per session and one agent serving ``default``.

The stack (api-server, scheduler, dag-processor, triggerer, gateway on 127.0.0.1, SQLite) takes
about a minute to start on a 2-core box, so every e2e test shares it; each test triggers its own
DAG run. Every assertion that can fail carries the run's task instances, our job rows and the tail
of every component's log, because an e2e failure is rarely explained by the assertion alone.

How a test proves an agent ran a task: the task prints an ``EDGE_PROBE`` line (see
``dags/e2e_probe.py``) with its process ancestry; the agent's ``edge-agent run`` pid must be in it,
and the environment marker only agents get must be set. Loopback hostnames cannot tell the agent
from the scheduler. The TI's ``executor`` field and our job table's ``agent_id`` are checked too.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E_DAGS = Path(__file__).resolve().parent / "dags"
sys.path.insert(0, str(ROOT / "scripts"))

from localstack import EXECUTOR_NAME, AgentProcess, LocalStack, StackError, TaskInstance  # noqa: E402

# Keep in step with dags/e2e_probe.py (not imported: that file belongs to the DAG bundle).
PROBE_PREFIX = "EDGE_PROBE "
MARKER_ENV = "E2E_AGENT_MARKER"

DEFAULT_QUEUE = "default"
REGION = "test-1"
RUN_TIMEOUT = 240.0
LOG_TIMEOUT = 60.0


class StatsdCollector:
    """A UDP socket on loopback keeping every StatsD line the hosted components send."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._read, name="statsd-collector", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed:
            try:
                packet = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.cond:
                self.lines += packet.decode("utf-8", "replace").splitlines()
                self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float, since: int = 0) -> list[str]:
        """The lines received after ``since`` once ``predicate`` holds for them (fails after ``timeout``)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.lines[since:]), timeout)
            lines = self.lines[since:]
        if not ok:
            ours = [line for line in lines if ".edge_agent." in line]
            pytest.fail(f"StatsD: condition not met within {timeout:.0f} s; {len(lines)} lines received, "
                        f"ours: {ours[-40:]}", pytrace=False)
        return lines

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="session")
def statsd() -> Iterator[StatsdCollector]:
    collector = StatsdCollector()
    try:
        yield collector
    finally:
        collector.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, statsd: StatsdCollector) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("stack")
    local = LocalStack(home, E2E_DAGS, statsd_port=statsd.port)
    try:
        local.start()
    except StackError as exc:
        pytest.fail(f"the local stack did not start (logs under {home / 'logs'}):\n{exc}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


def start_agent(stack: LocalStack, name: str, queues: list[str], **kwargs: Any) -> AgentProcess:
    try:
        agent = stack.start_agent(name, queues, REGION, extra_env={MARKER_ENV: name}, **kwargs)
    except StackError as exc:
        pytest.fail(f"agent {name} did not start:\n{exc}", pytrace=False)
    if not agent.agent_id:
        pytest.fail(f"'edge-agent status --json' names no agent_id for {name}: {agent.status()}", pytrace=False)
    return agent


@pytest.fixture(scope="session")
def agent(stack: LocalStack) -> AgentProcess:
    return start_agent(stack, "e2e-default", [DEFAULT_QUEUE], concurrency=4)


class E2E:
    """Runs DAGs on the stack and checks where their tasks ran, failing with full context."""

    region = REGION
    dags_dir = E2E_DAGS

    def __init__(self, stack: LocalStack, agent: AgentProcess) -> None:
        self.stack = stack
        self.agent = agent

    def start_agent(self, name: str, queues: list[str], **kwargs: Any) -> AgentProcess:
        """Another agent for one test; the caller stops it (``agent.stop()``) in a ``finally``."""
        return start_agent(self.stack, name, queues, **kwargs)

    # ---- failing with context -------------------------------------------------------------------

    def fail(self, message: str, dag_id: str | None = None, run_id: str | None = None) -> NoReturn:
        parts = [message]
        if dag_id and run_id:
            parts.append(self.stack.describe_run(dag_id, run_id))
        parts.append(self.stack.log_tails(50))
        pytest.fail("\n".join(parts), pytrace=False)

    def check(self, condition: object, message: str, dag_id: str | None = None, run_id: str | None = None) -> None:
        if not condition:
            self.fail(message, dag_id, run_id)

    # ---- runs -----------------------------------------------------------------------------------

    def run(self, dag_id: str, expect: str = "success", conf: dict[str, Any] | None = None) -> str:
        """Trigger ``dag_id``, wait for the run to end, and check it ended in ``expect``."""
        try:
            run_id = self.stack.trigger(dag_id, conf)
            state = self.stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT)
        except StackError as exc:
            self.fail(f"run of {dag_id} did not finish:\n{exc}")
        self.check(state == expect, f"run of {dag_id} ended {state!r}, expected {expect!r}", dag_id, run_id)
        return run_id

    def ti(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> TaskInstance:
        try:
            return self.stack.task_instance(dag_id, run_id, task_id, map_index)
        except StackError as exc:
            self.fail(str(exc), dag_id, run_id)

    def log(self, dag_id: str, run_id: str, ti: TaskInstance, needle: str, try_number: int | None = None) -> str:
        """The TI's log through Airflow's REST API, once it contains ``needle``."""
        try:
            return self.stack.wait_log(
                dag_id, run_id, ti.task_id, try_number or ti.try_number, needle, LOG_TIMEOUT, ti.map_index
            )
        except StackError as exc:
            self.fail(f"log of {ti.task_id}[{ti.map_index}] via REST lacks {needle!r}:\n{exc}", dag_id, run_id)

    # ---- where did it run -----------------------------------------------------------------------

    @staticmethod
    def probes(log_text: str) -> list[dict[str, Any]]:
        found = []
        for line in log_text.splitlines():
            at = line.find(PROBE_PREFIX)
            if at >= 0:
                probe, _ = json.JSONDecoder().raw_decode(line[at + len(PROBE_PREFIX):])
                found.append(probe)
        return found

    def assert_on_agent(
        self, dag_id: str, run_id: str, ti: TaskInstance, needle: str,
        agent: AgentProcess | None = None, try_number: int | None = None,
    ) -> str:
        """Check the TI ran on ``agent`` (default: the session agent); return its REST log text."""
        agent = agent or self.agent
        where = f"{dag_id}/{ti.task_id}[{ti.map_index}]"
        self.check(ti.executor == EXECUTOR_NAME, f"{where}: executor is {ti.executor!r}", dag_id, run_id)
        text = self.log(dag_id, run_id, ti, needle, try_number)
        probes = self.probes(text)
        self.check(probes, f"{where}: no {PROBE_PREFIX.strip()} line in the REST log:\n{text[-3000:]}", dag_id, run_id)
        for probe in probes:
            self.check(
                agent.proc.pid in probe["ancestors"],
                f"{where}: task process {probe['pid']} does not descend from agent {agent.name} "
                f"(pid {agent.proc.pid}); ancestry {probe['ancestors']}",
                dag_id, run_id,
            )
            self.check(
                probe["marker"] == agent.name,
                f"{where}: marker {probe['marker']!r}, expected {agent.name!r}", dag_id, run_id,
            )
        jobs = [
            j for j in self.stack.agent_jobs(dag_id, run_id)
            if j["task_id"] == ti.task_id and j["map_index"] == ti.map_index and j["agent_id"]
        ]
        # Rows are purged a while after they are reported; the ones still there must name the agent.
        self.check(
            all(j["agent_id"] == agent.agent_id for j in jobs),
            f"{where}: job rows name agents {[j['agent_id'] for j in jobs]}, expected {agent.agent_id}",
            dag_id, run_id,
        )
        return text

    def assert_on_hosted(self, dag_id: str, run_id: str, ti: TaskInstance, needle: str) -> str:
        where = f"{dag_id}/{ti.task_id}"
        self.check(ti.executor == "LocalExecutor", f"{where}: executor is {ti.executor!r}", dag_id, run_id)
        text = self.log(dag_id, run_id, ti, needle)
        agent_pids = {a.proc.pid for a in self.stack.agents}
        for probe in self.probes(text):
            self.check(
                not agent_pids & set(probe["ancestors"]) and not probe["marker"],
                f"{where}: a LocalExecutor task ran under an agent: {probe}", dag_id, run_id,
            )
        return text


@pytest.fixture()
def e2e(stack: LocalStack, agent: AgentProcess) -> E2E:
    for proc in [*stack.components, agent]:
        if not proc.alive:
            pytest.fail(f"{proc.name} is not running before the test:\n{stack.log_tails(60)}", pytrace=False)
    return E2E(stack, agent)
