"""Render the chaos suite's figures (``build/chaos/*.json``) as the markdown tables of ``docs/reliability.md``.

Usage: ``python tests/chaos/report.py [--dir build/chaos]`` prints markdown on stdout: one row per
test (tasks, tries, faults, tasks lost, duplicates, lost reports, result), then the timings each
test measured, then the setup the figures were taken with and any problem a test reported.
Reads only the JSON files the tests write (``chaos_harness.Chaos._write``); imports nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "build" / "chaos"
#: The tests in the order they run; any other figures file follows, by name.
ORDER = ("gateway_kill", "agent_kill", "partition", "scheduler_restart", "drain")

#: Timing figures (seconds) and what they measure, in the order they are shown.
TIMINGS: dict[str, str] = {
    "gateway_outage_s": "gateway down: kill -9 → restarted gateway serves TLS again",
    "gateway_ready_s": "gateway restart → serving TLS",
    "agent_heartbeat_s": "gateway restart → its agent's next heartbeat accepted",
    "agent_lease_s": "gateway restart → its agent's next lease",
    "first_task_finished_s": "gateway restart → first task finished through it",
    "detection_s": "fault → `airflow edge-agents list` shows the agent offline (upper bound: one CLI call)",
    "requeue_s": "fault → the agent's leased, unstarted jobs back in the queue",
    "killed_tries_retried_s": "kill → Airflow failed the killed tries and scheduled their retries",
    "restart_s": "agent restart → its gateway accepts its heartbeats",
    "agent_noticed_s": "partition → the agent's status shows the gateway unreachable",
    "partition_s": "partition length",
    "heal_heartbeat_s": "heal → the agent's next heartbeat accepted",
    "spool_drained_s": "heal → the agent's spool replayed and empty",
    "heal_lease_s": "heal → the agent's next lease",
    "scheduler_exit_s": "SIGTERM → the scheduler exited",
    "scheduler_back_s": "scheduler restart → heartbeating again",
    "drain_exit_s": "SIGTERM → the drained agent exited",
    "run_seconds": "whole DAG run (trigger → run finished)",
}
#: Counts shown next to the timings.
COUNTS: dict[str, str] = {
    "in_flight_on_a": "tries whose code was running on agent A when the fault struck",
    "started_at_fault": "tries agent A had started (supervisor) and not finished when killed",
    "in_flight_on_b": "tries agent B held when SIGTERM came",
    "leased_at_fault": "jobs leased to the agent, not started, when the fault struck",
    "spool_max_jobs": "most job reports spooled during the partition",
    "drained_reported": "of those, reported success before the agent exited",
    "drain_exit_code": "exit code of the drained agent",
    "scheduler_exit_code": "exit code of the scheduler after SIGTERM",
}


def load(directory: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "test" in data:
            results.append(data)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(results, key=lambda r: (rank.get(r["test"], len(ORDER)), r["test"]))


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _sum(results: list[dict[str, Any]], key: str) -> str:
    values = [r.get(key) for r in results]
    return str(sum(v for v in values if isinstance(v, int))) + ("" if all(isinstance(v, int) for v in values) else "*")


def render(results: list[dict[str, Any]]) -> str:
    if not results:
        return "No chaos figures found (run `make test-chaos` first).\n"
    out = [
        (
            "| Test | Fault injected | Tasks | Tries run | Failed tries (allowed) | Faults | Tasks lost | Duplicates "
            "| Reports lost | Result |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        failed = f"{_num(r.get('failed_tries'))} ({_num(r.get('allowed_failures'))})"
        out.append(
            f"| {r.get('title', r['test'])} | {r.get('fault', '')} | {_num(r.get('tasks'))} | {_num(r.get('tries_run'))} "
            f"| {failed} | {_num(r.get('faults_injected'))} | {_num(r.get('tasks_lost'))} "
            f"| {_num(r.get('duplicates'))} | {_num(r.get('reports_lost'))} | {'pass' if r.get('passed') else 'FAIL'} |"
        )
    out.append(
        f"| **Total** | | {_sum(results, 'tasks')} | {_sum(results, 'tries_run')} | {_sum(results, 'failed_tries')} "
        f"| {_sum(results, 'faults_injected')} | {_sum(results, 'tasks_lost')} | {_sum(results, 'duplicates')} "
        f"| {_sum(results, 'reports_lost')} | {sum(1 for r in results if r.get('passed'))}/{len(results)} pass |"
    )
    out += ["", "| Test | Measured | Value |", "|---|---|---:|"]
    for r in results:
        figures = r.get("figures") or {}
        title = r.get("title", r["test"])
        for key, label in TIMINGS.items():
            if key in figures:
                value = figures[key]
                out.append(f"| {title} | {label} | {'not seen' if value is None else f'{value:.1f} s'} |")
        for key, label in COUNTS.items():
            if key in figures:
                out.append(f"| {title} | {label} | {_num(figures[key])} |")
    config = results[0].get("config") or {}
    out += [
        "",
        (
            f"Setup: {config.get('schedulers', '?')} schedulers, {config.get('gateways', '?')} gateways and "
            f"{config.get('agents', '?')} agents ({config.get('agent_concurrency', '?')} slots each) on one "
            f"PostgreSQL, {config.get('cpus', '?')} CPUs; tasks sleep 0.2–1.5 s, retries {config.get('retries', '?')}; "
            f"`[scheduler] task_instance_heartbeat_timeout = {config.get('task_instance_heartbeat_timeout_s', '?')}`, "
            f"`[edge_agent] agent_dead_after_seconds = {config.get('agent_dead_after_s', '?')}`. "
            f"Recorded {min(r.get('recorded_at', '') for r in results)[:10]}."
        ),
        "",
        (
            "*Tries run*: tries whose code started (the DAG's own ledger). *Failed tries (allowed)*: tries "
            "Airflow failed, and how many the fault could fail (the tries it caught on the hurt agent); "
            "a task whose try failed must succeed on a retry. *Duplicates*: tries run twice by the ledger, or with "
            "two `run` entries in the agents' audit logs (Airflow accepted the try's `/run` from that agent). "
            "*Reports lost*: job rows left open, or closed in a state Airflow disagrees "
            "with, or agent reports for jobs without a row."
        ),
    ]
    failing = [r for r in results if not r.get("passed")]
    if failing:
        out += ["", "Problems reported:", ""]
        for r in failing:
            for problem in r.get("problems") or ["(no problem recorded)"]:
                out.append(f"* {r.get('title', r['test'])}: {problem.splitlines()[0]}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the figures are (default build/chaos)")
    args = parser.parse_args(argv)
    sys.stdout.write(render(load(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
