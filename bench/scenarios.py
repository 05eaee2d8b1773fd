"""The benchmark's scenarios: one function each, run against one executor of a running :class:`BenchStack`.

Every executor-scenario function takes ``(bench, executor)`` and returns one :class:`Record` (one
executor, one scenario, one round). What each measures:

* :func:`dispatch`: ``dispatch_runs`` runs of ``bench_dispatch__<ex>`` (a few trivial tasks, all
  slots free). Dispatch latency = the TI's ``queued_dttm`` -> ``start_date`` (``start_date`` is set
  when the task process calls the Execution API's ``/run``, i.e. when it is running on the worker).
* :func:`makespan`: one run of ``bench_trivial__<ex>`` (100 independent trivial tasks). Makespan =
  first ``queued_dttm`` -> last ``end_date``; tasks per minute; HTTP requests per task from the
  access logs (agent: the gateway's ``/agents/v1`` + ``/execution``; edge3: the api-server's
  ``/edge_worker/v1`` + ``/execution``; LocalExecutor: the api-server's ``/execution``), counted
  from the trigger until the run ended plus a few seconds (late state reports and log shipping).
* :func:`memory`: the worker's process tree idle, then with ``sleep_tasks`` tasks sleeping at once.
  PSS per running task = (tree PSS running - tree PSS idle) / tasks. Idle RSS of the tree's main
  process (the agent's control process; edge3's worker; LocalExecutor's scheduler) and, for the
  agent, of its runtime zygote. Trees: agent = ``edge-agent run`` and descendants; edge3 =
  ``airflow edge worker`` and descendants; LocalExecutor = the scheduler and descendants (its
  pre-forked workers included).
* :func:`gateway_longpoll` (executor-independent): :mod:`bench.gateway_load`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import procstat
from bench.stack import AccessLog, BenchStack
from bench.stats import median

T = TypeVar("T")

EXECUTORS = ("agent", "local", "edge3")
EXECUTOR_NAMES = {"agent": "EdgeAgentExecutor", "local": "LocalExecutor", "edge3": "EdgeExecutor (edge3)"}
#: Requests that count as the executor's HTTP traffic, per log file.
HTTP_PREFIXES = {
    "agent": ("gateway", ("/agents/v1", "/execution")),
    "edge3": ("api-server", ("/edge_worker/v1", "/execution")),
    "local": ("api-server", ("/execution",)),
}
#: After a run ends: agents report states and ship logs a moment later; count those requests too.
HTTP_TAIL_SECONDS = 3.0
RUN_TIMEOUT = 900.0
PAUSE = 0.5


class ScenarioError(RuntimeError):
    """A scenario could not produce its figures (a run failed, a wait timed out)."""


@dataclass
class Options:
    rounds: int = 3
    concurrency: int = 16
    dispatch_runs: int = 3
    dispatch_tasks: int = 5
    trivial_tasks: int = 100
    sleep_tasks: int = 16
    sleep_seconds: float = 30.0
    lp_clients: int = 1000
    lp_samples: int = 40
    lp_idle_seconds: float = 10.0
    profile: bool = False


@dataclass
class Record:
    executor: str
    scenario: str
    round: int
    tasks: int = 0
    dispatch_s: list[float] = field(default_factory=list)
    makespan_s: float | None = None
    tasks_per_minute: float | None = None
    pss_per_task_mb: float | None = None
    idle_pss_mb: float | None = None
    running_pss_mb: float | None = None
    idle_rss_mb: float | None = None
    idle_rss_zygote_mb: float | None = None
    http_requests: int | None = None
    http_requests_per_task: float | None = None
    http_by_prefix: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Bench:
    """What every scenario needs: the stack, the options, where to put side files."""

    stack: BenchStack
    options: Options
    out_dir: Path
    log: Callable[[str], None] = print
    _stop: threading.Event = field(default_factory=threading.Event)

    def dag_id(self, shape: str, executor: str) -> str:
        return f"bench_{shape}__{executor}"

    def wait(self, what: str, check: Callable[[], T | None], timeout: float) -> T:
        """Call ``check`` every ``PAUSE`` seconds until it returns a value; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}")
            self._stop.wait(PAUSE)

    def root_pid(self, executor: str) -> int:
        """The pid whose process tree is the executor's worker side."""
        if executor == "agent":
            return self.stack.agents[0].proc.pid
        if executor == "edge3":
            if self.stack.edge3_worker is None:
                raise ScenarioError("edge3 worker not started")
            return self.stack.edge3_worker.proc.pid
        return self.stack.component("scheduler").proc.pid

    def run_dag(self, dag_id: str, conf: dict[str, Any] | None = None) -> tuple[str, list[Any]]:
        run_id = self.stack.trigger(dag_id, conf)
        state = self.stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT)
        tis = self.stack.task_instances(dag_id, run_id)
        if state != "success":
            bad = [f"{ti.task_id}={ti.state}" for ti in tis if ti.state != "success"]
            raise ScenarioError(f"{dag_id} run {run_id} ended {state}: {', '.join(bad[:10])}")
        return run_id, tis


def _window(tis: list[Any]) -> tuple[datetime, datetime]:
    first = min(ti.queued_at for ti in tis if ti.queued_at)
    last = max(ti.end_date for ti in tis if ti.end_date)
    return first, last


def _dispatch_samples(tis: list[Any]) -> list[float]:
    return [ti.queued_to_start for ti in tis if ti.queued_to_start is not None]


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _refill_ms(tis: list[Any]) -> float | None:
    """Median ms from a task's end to the queueing of a task that waited for a slot.

    For each task queued after the first one ended, the gap between the latest end before its
    ``queued_dttm`` and that ``queued_dttm``: how long the scheduler took to learn that a slot was
    free (executor event) and fill it. Executor-independent: TI timestamps only.
    """
    ends = sorted(ti.end_date for ti in tis if ti.end_date)
    gaps = []
    for ti in tis:
        if ti.queued_at is None:
            continue
        before = [end for end in ends if end <= ti.queued_at]
        if before:
            gaps.append((ti.queued_at - before[-1]).total_seconds() * 1000)
    return median(gaps)


def _phases(bench: Bench, executor: str, dag_id: str, run_id: str, tis: list[Any]) -> dict[str, float | None]:
    """Median milliseconds of each step of a task's life, where this executor lets us see it.

    Every executor: ``run`` = TI start_date -> end_date (the task process's life as Airflow saw
    it). The agent also has its job rows: ``wake_lease`` = job queued -> leased (gateway),
    ``lease_to_start`` = leased -> TI start_date (agent, zygote fork, supervisor, ``/run``),
    ``end_to_report`` = TI end_date -> job finished (supervisor exit noticed, state reported).
    ``refill``: see :func:`_refill_ms`.
    """
    def ms(pairs: list[tuple[datetime | None, datetime | None]]) -> float | None:
        values = [(b - a).total_seconds() * 1000 for a, b in pairs if a is not None and b is not None]
        return median(values)

    out = {"run": ms([(ti.start_date, ti.end_date) for ti in tis]), "refill": _refill_ms(tis)}
    if executor == "agent":
        try:
            jobs = {(j["task_id"], j["map_index"]): j for j in bench.stack.agent_jobs(dag_id, run_id)}
        except Exception as exc:  # noqa: BLE001 - diagnostics only: never fail a scenario over them
            return {**out, "error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
        pairs = [(ti, jobs.get((ti.task_id, ti.map_index))) for ti in tis]
        out["wake_lease"] = ms([(_as_utc(j["queued_at"]), _as_utc(j["leased_at"])) for _, j in pairs if j])
        out["lease_to_start"] = ms([(_as_utc(j["leased_at"]), ti.start_date) for ti, j in pairs if j])
        out["end_to_report"] = ms([(ti.end_date, _as_utc(j["finished_at"])) for ti, j in pairs if j])
    return out


def _count_http(bench: Bench, executor: str, log: AccessLog, tasks: int, rec: Record) -> None:
    _, prefixes = HTTP_PREFIXES[executor]
    bench._stop.wait(HTTP_TAIL_SECONDS)
    counts = log.count(prefixes)
    rec.http_by_prefix = counts
    rec.http_requests = sum(counts.values())
    rec.http_requests_per_task = rec.http_requests / tasks if tasks else None


class CpuMeter:
    """CPU seconds used by the parts of the deployment between two moments.

    ``worker``: the executor's worker tree (agent; edge3 worker; LocalExecutor's workers, i.e. the
    scheduler's tree minus the scheduler process itself), tasks included; ``scheduler``: the
    scheduler process; ``api-server`` and ``gateway``: their trees.
    """

    def __init__(self, bench: Bench, executor: str) -> None:
        self.bench = bench
        self.executor = executor
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        stack = self.bench.stack
        scheduler = stack.component("scheduler").proc.pid
        root = self.bench.root_pid(self.executor)
        out = {
            "worker": procstat.tree_cpu_seconds(root),
            "scheduler": procstat.cpu_seconds(scheduler) or 0.0,
            "api-server": procstat.tree_cpu_seconds(stack.component("api-server").proc.pid),
            "gateway": procstat.tree_cpu_seconds(stack.component("gateway").proc.pid),
        }
        if root == scheduler:
            out["worker"] -= out["scheduler"]
        return out

    def per_task(self, tasks: int) -> dict[str, float]:
        end = self._read()
        out = {k: round((end[k] - self.start[k]) / max(tasks, 1), 3) for k in end}
        out["total"] = round(sum(out.values()), 3)
        return out


def _access_log(bench: Bench, executor: str) -> AccessLog:
    component, _ = HTTP_PREFIXES[executor]
    return AccessLog(bench.stack.component(component).log_path)


# --------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------


def warmup(bench: Bench, executor: str) -> Record:
    """One dispatch run, not counted: first-use costs (imports, connections, DAG parse caches)."""
    rec = Record(executor, "warmup", 0)
    _, tis = bench.run_dag(bench.dag_id("dispatch", executor))
    rec.tasks = len(tis)
    return rec


def dispatch(bench: Bench, executor: str, round_no: int = 1) -> Record:
    rec = Record(executor, "dispatch", round_no)
    log = _access_log(bench, executor)
    phases = []
    for _ in range(bench.options.dispatch_runs):
        dag_id = bench.dag_id("dispatch", executor)
        run_id, tis = bench.run_dag(dag_id)
        rec.dispatch_s += _dispatch_samples(tis)
        rec.tasks += len(tis)
        phases.append(_phases(bench, executor, dag_id, run_id, tis))
    rec.extra["phases_ms"] = phases
    _count_http(bench, executor, log, rec.tasks, rec)
    return rec


def makespan(bench: Bench, executor: str, round_no: int = 1) -> Record:
    rec = Record(executor, "makespan", round_no)
    log = _access_log(bench, executor)
    cpu = CpuMeter(bench, executor)
    profiler = _maybe_profile(bench, executor, f"makespan-{executor}-r{round_no}")
    dag_id = bench.dag_id("trivial", executor)
    try:
        run_id, tis = bench.run_dag(dag_id)
    finally:
        if profiler is not None:
            rec.extra["profile"] = profiler.finish()
    rec.extra["phases_ms"] = _phases(bench, executor, dag_id, run_id, tis)
    rec.tasks = len(tis)
    rec.dispatch_s = _dispatch_samples(tis)
    first, last = _window(tis)
    rec.makespan_s = (last - first).total_seconds()
    rec.tasks_per_minute = 60.0 * rec.tasks / rec.makespan_s if rec.makespan_s > 0 else None
    _count_http(bench, executor, log, rec.tasks, rec)
    rec.extra["cpu_s_per_task"] = cpu.per_task(rec.tasks)
    return rec


def _zygote_pid(control: int) -> int | None:
    """The agent's runtime zygote: the control process's child that says so in its command line
    (it renames itself "edge-agent runtime zygote" once started; before that it is
    ``python -m edge_agent.runtime.zygote``)."""
    children = procstat.children(control)
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"zygote" in cmdline:
            return pid
    return None


def memory(bench: Bench, executor: str, round_no: int = 1) -> Record:
    rec = Record(executor, "memory", round_no)
    n = bench.options.sleep_tasks
    root = bench.root_pid(executor)
    bench._stop.wait(2.0)  # the previous run's processes have exited and been reaped
    idle = procstat.tree_memory(root)
    rec.idle_pss_mb = idle.pss_mb
    rss = procstat.rss_kb(root)
    rec.idle_rss_mb = rss / 1024 if rss is not None else None
    if executor == "agent":
        zygote = _zygote_pid(root)
        zrss = procstat.rss_kb(zygote) if zygote else None
        rec.idle_rss_zygote_mb = zrss / 1024 if zrss is not None else None
        zpss = procstat.pss_kb(zygote) if zygote else None
        rec.extra["idle_pss_zygote_mb"] = zpss / 1024 if zpss is not None else None
        cpss = procstat.pss_kb(root)
        rec.extra["idle_pss_control_mb"] = cpss / 1024 if cpss is not None else None
    rec.extra["idle_processes"] = idle.pids

    dag_id = bench.dag_id("sleep", executor)
    run_id = bench.stack.trigger(dag_id, {"seconds": bench.options.sleep_seconds})

    def all_running() -> bool | None:
        tis = bench.stack.task_instances(dag_id, run_id)
        running = sum(1 for ti in tis if ti.state == "running")
        if any(ti.state in ("success", "failed") for ti in tis):
            raise ScenarioError(f"a task of {dag_id} ended before all {n} ran at once: raise --sleep-seconds")
        return True if running >= n else None

    bench.wait(f"{n} tasks of {dag_id} running at once", all_running, bench.options.sleep_seconds * 4 + 120)
    bench._stop.wait(1.0)  # every task process has passed its /run call and is sleeping
    samples = []
    for _ in range(3):
        samples.append(procstat.tree_memory(root))
        bench._stop.wait(1.0)
    running = sorted(samples, key=lambda m: m.pss_mb)[1]
    rec.extra["running_by_process"] = procstat.pss_by_kind(root)
    rec.running_pss_mb = running.pss_mb
    rec.pss_per_task_mb = (running.pss_mb - idle.pss_mb) / n
    rec.extra["running_processes"] = running.pids
    rec.extra["running_rss_sum_mb"] = running.rss_mb
    rec.tasks = n
    state = bench.stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT)
    if state != "success":
        raise ScenarioError(f"{dag_id} run {run_id} ended {state}")
    return rec


def gateway_longpoll(bench: Bench) -> Record:
    """Stops every component but the gateway (their CPU would be measured as noise), then loads it."""
    from bench.gateway_load import run_longpoll

    rec = Record("agent", "gateway_longpoll", 1)
    stack = bench.stack
    keep = {"gateway"}
    stack.stop_components([c.name for c in [*stack.agents, *stack.components] if c.name not in keep])
    gateway = stack.component("gateway")
    assert stack._ca_file is not None
    profiler = _maybe_profile(bench, "gateway", "gateway-longpoll", duration=bench.options.lp_samples * 0.6 + 30)
    try:
        figures = asyncio.run(
            run_longpoll(
                gateway_url=stack.gateway_url,
                gateway_pid=gateway.proc.pid,
                ca_file=stack._ca_file,
                hosted_env=stack.env,
                work_dir=bench.out_dir / "longpoll",
                clients=bench.options.lp_clients,
                samples=bench.options.lp_samples,
                idle_seconds=bench.options.lp_idle_seconds,
            )
        )
    finally:
        if profiler is not None:
            rec.extra["profile"] = profiler.finish()
    rec.extra.update(figures)
    rec.tasks = figures["samples"]
    return rec


# --------------------------------------------------------------------------------------------------
# Optional profiling (py-spy, when installed: the bench extra)
# --------------------------------------------------------------------------------------------------


def _maybe_profile(bench: Bench, target: str, label: str, duration: float = 600.0) -> Any:
    if not bench.options.profile:
        return None
    from bench.profile import PySpy

    if target == "gateway":
        pid = bench.stack.component("gateway").proc.pid
    else:
        pid = bench.root_pid(target)
    return PySpy.start(pid, bench.out_dir / "profiles" / f"{label}.txt", duration=duration)


SCENARIOS: dict[str, Callable[..., Record]] = {"dispatch": dispatch, "makespan": makespan, "memory": memory}


def summarise(records: list[Record]) -> dict[str, Any]:
    """Median of the per-round figures (dispatch samples are pooled) for one executor and scenario."""
    ok = [r for r in records if r.error is None]
    pooled = [s for r in ok for s in r.dispatch_s]

    def med(attr: str) -> float | None:
        return median([getattr(r, attr) for r in ok if getattr(r, attr) is not None])

    from bench.stats import p95

    def nested(name: str) -> dict[str, float | None]:
        dicts: list[dict[str, Any]] = []
        for r in ok:
            value = r.extra.get(name)
            dicts += value if isinstance(value, list) else [value] if isinstance(value, dict) else []
        keys = dict.fromkeys(k for d in dicts for k, v in d.items() if isinstance(v, (int, float)))
        return {k: median([d[k] for d in dicts if isinstance(d.get(k), (int, float))]) for k in keys}

    return {
        "rounds": len(ok),
        "errors": [r.error for r in records if r.error],
        "tasks_per_round": med("tasks"),
        "dispatch_samples": len(pooled),
        "dispatch_ms_median": _ms(median(pooled)),
        "dispatch_ms_p95": _ms(p95(pooled)),
        "makespan_s": med("makespan_s"),
        "tasks_per_minute": med("tasks_per_minute"),
        "pss_per_task_mb": med("pss_per_task_mb"),
        "idle_pss_mb": med("idle_pss_mb"),
        "idle_rss_mb": med("idle_rss_mb"),
        "idle_rss_zygote_mb": med("idle_rss_zygote_mb"),
        "http_requests_per_task": med("http_requests_per_task"),
        "cpu_s_per_task": nested("cpu_s_per_task") or None,
        "phases_ms": nested("phases_ms") or None,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


__all__ = [
    "EXECUTORS",
    "EXECUTOR_NAMES",
    "SCENARIOS",
    "Bench",
    "Options",
    "Record",
    "ScenarioError",
    "dispatch",
    "gateway_longpoll",
    "makespan",
    "memory",
    "summarise",
    "warmup",
]
