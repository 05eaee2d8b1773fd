"""``python -m bench.run``: the benchmark of issue 5 (``make bench`` runs it in ``build/bench-venv``).

Starts one deployment (PostgreSQL by default) in which LocalExecutor, EdgeAgentExecutor and, when
the provider is installed, edge3's EdgeExecutor are all configured with the same number of slots,
plus one ``edge-agent run`` and one ``airflow edge worker``. Then, for each round, each scenario
runs once per executor, the executors' order rotating from round to round; the gateway's long-poll
test runs last, with every other component stopped. It prints a table, writes
``bench/results/latest.json`` and rewrites the generated block of ``docs/benchmarks.md`` (table and
charts). ``--quick`` is a small run for trying the harness; see ``--help`` for the knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from bench import edge3_env, report
from bench.scenarios import (
    EXECUTORS,
    SCENARIOS,
    Bench,
    Options,
    Record,
    gateway_longpoll,
    warmup,
)

ALL_SCENARIOS = (*SCENARIOS, "gateway")
DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_DOC = ROOT / "docs" / "benchmarks.md"
DEFAULT_CHARTS = ROOT / "docs" / "benchmarks"
DAGS = ROOT / "bench" / "dags"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of every executor scenario (default 3; --quick 1)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}")
    p.add_argument("--executors", default=None,
                   help="comma-separated subset of agent,local,edge3 (default: all; edge3 when installed)")
    p.add_argument("--quick", action="store_true",
                   help="a small run: 1 round, 20 trivial tasks, 4 slots, 100 long-poll clients")
    p.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    p.add_argument("--concurrency", type=int, default=None, help="slots per executor (default 16; --quick 4)")
    p.add_argument("--trivial-tasks", type=int, default=None, help="tasks in the makespan DAG (default 100)")
    p.add_argument("--dispatch-runs", type=int, default=None, help="dispatch DAG runs per round (default 3)")
    p.add_argument("--dispatch-tasks", type=int, default=None, help="tasks per dispatch run (default 5)")
    p.add_argument("--sleep-seconds", type=float, default=None, help="how long memory-scenario tasks sleep")
    p.add_argument("--lp-clients", type=int, default=None, help="simulated long-polling agents (default 1000)")
    p.add_argument("--lp-samples", type=int, default=None, help="wake-ups measured (default 40)")
    p.add_argument("--lp-idle-seconds", type=float, default=None,
                   help="how long the gateway's CPU is measured with every poll held and nothing queued (default 10)")
    p.add_argument("--scheduler-parallelism", type=int, default=None,
                   help="experiment: [core] parallelism above the slots, so the scheduler queues ahead "
                        "(not with LocalExecutor, which would fork that many workers)")
    p.add_argument("--no-warmup", action="store_true", help="skip the uncounted first run per executor")
    p.add_argument("--profile", action="store_true",
                   help="sample the agent (makespan) and the gateway (long-poll test) with py-spy")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where latest.json goes")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the Markdown file whose generated block is rewritten")
    p.add_argument("--no-doc", action="store_true", help="do not touch the doc or its charts")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="stack home and logs (default: build/bench-work/<time>; kept for inspection)")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    opts = Options(
        rounds=args.rounds or (1 if quick else 3),
        concurrency=args.concurrency or (4 if quick else 16),
        dispatch_runs=args.dispatch_runs or (1 if quick else 3),
        dispatch_tasks=args.dispatch_tasks or (3 if quick else 5),
        trivial_tasks=args.trivial_tasks or (20 if quick else 100),
        sleep_seconds=args.sleep_seconds or (15.0 if quick else 30.0),
        lp_clients=args.lp_clients or (100 if quick else 1000),
        lp_samples=args.lp_samples or (10 if quick else 40),
        lp_idle_seconds=args.lp_idle_seconds or (5.0 if quick else 10.0),
        profile=args.profile,
    )
    opts.sleep_tasks = opts.concurrency  # the memory scenario fills every slot
    return opts


def choose_executors(args: argparse.Namespace) -> list[str]:
    if args.executors:
        chosen = [e.strip() for e in args.executors.split(",") if e.strip()]
        unknown = set(chosen) - set(EXECUTORS)
        if unknown:
            raise SystemExit(f"unknown executor(s): {', '.join(sorted(unknown))}")
        if "edge3" in chosen and not edge3_env.available():
            raise SystemExit("edge3 is not installed in this interpreter: run `make bench` (it uses build/bench-venv)")
        return chosen
    return [e for e in EXECUTORS if e != "edge3" or edge3_env.available()]


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("apache-airflow", "apache-airflow-task-sdk", "apache-airflow-providers-edge3", "edge-agent", "uvicorn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], check=False, cwd=ROOT, capture_output=True, text=True,
                               timeout=30).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _loadavg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


class _Terminated(Exception):
    pass


def _on_sigterm(*_: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    opts = options_from(args)
    executors = choose_executors(args)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.scheduler_parallelism and "local" in executors:
        raise SystemExit("--scheduler-parallelism cannot be combined with LocalExecutor (it forks that many workers)")
    if "gateway" in scenarios and "agent" not in executors:
        raise SystemExit("the gateway scenario needs the agent executor")
    signal.signal(signal.SIGTERM, _on_sigterm)

    from bench.gateway_load import raise_nofile

    # Each held long-poll is a socket in the gateway and one in this process (the clients).
    nofile = raise_nofile(2 * opts.lp_clients + 1024)
    work = (args.work_dir or ROOT / "build" / "bench-work" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
        "database": args.db,
        "executors": executors,
        "scenarios": scenarios,
        "options": {**asdict(opts), "scheduler_parallelism": args.scheduler_parallelism or opts.concurrency},
        "versions": _versions(),
        "open_files_limit": nofile,
        "work_dir": str(work),
    }
    print(f"bench: work dir {work}; executors {', '.join(executors)}; scenarios {', '.join(scenarios)}; "
          f"{opts.rounds} round(s)", flush=True)

    records: list[Record] = []
    gateway: dict[str, Any] | None = None
    stack = pg = pg_dir = None
    try:
        workers = executors if any(s in SCENARIOS for s in scenarios) else []
        stack, pg, pg_dir = start_deployment(args, opts, executors, workers, work)
        meta["startup_s"] = round(time.monotonic() - started, 1)
        bench = Bench(stack=stack, options=opts, out_dir=work, log=lambda m: print(m, flush=True))
        executor_scenarios = [s for s in scenarios if s in SCENARIOS]
        if executor_scenarios and not args.no_warmup:
            for executor in executors:
                _run(bench, lambda e=executor: warmup(bench, e), f"warm-up {executor}")
        for round_no in range(1, opts.rounds + 1):
            if not executor_scenarios:
                break
            order = executors[(round_no - 1) % len(executors):] + executors[:(round_no - 1) % len(executors)]
            for scenario in executor_scenarios:
                for executor in order:
                    rec = _run(
                        bench,
                        lambda fn=SCENARIOS[scenario], ex=executor, rn=round_no: fn(bench, ex, rn),
                        f"round {round_no} {scenario} {executor}",
                        fallback=Record(executor, scenario, round_no),
                    )
                    records.append(rec)
        if "gateway" in scenarios:
            rec = _run(bench, lambda: gateway_longpoll(bench), "gateway long-poll test",
                       fallback=Record("agent", "gateway_longpoll", 1))
            records.append(rec)
            gateway = dict(rec.extra) if rec.error is None else {"error": rec.error}
    except (KeyboardInterrupt, _Terminated):
        print("bench: interrupted; stopping the deployment", file=sys.stderr, flush=True)
        return 130
    finally:
        if stack is not None:
            stack.stop()
        if pg is not None:
            pg.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)

    meta["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = _loadavg()
    results = report.build_results([r for r in records if r.scenario in SCENARIOS])
    full = {
        "meta": meta,
        "results": results,
        "targets": report.evaluate_targets(results, gateway if gateway and "error" not in gateway else None),
        "gateway": gateway,
        "rounds": [r.as_dict() for r in records],
    }
    out = args.results_dir / "latest.json"
    report.write_json(full, out)
    (work / "latest.json").write_text(json.dumps(full, indent=2, default=str))
    print()
    print(report.render_text(full))
    print(f"\nbench: wrote {out}")
    if not args.no_doc:
        paths = report.charts(full, DEFAULT_CHARTS if args.doc == DEFAULT_DOC else args.doc.parent / args.doc.stem)
        report.update_doc(args.doc, report.render_markdown(full, paths, args.doc))
        print(f"bench: updated {args.doc}" + (f" and {len(paths)} chart(s)" if paths else " (no matplotlib: no charts)"))
    failed = [r for r in records if r.error]
    return 1 if failed else 0


def _run(bench: Bench, fn: Any, label: str, fallback: Record | None = None) -> Record:
    print(f"bench: {label} ...", flush=True)
    t0 = time.monotonic()
    try:
        rec = fn()
    except (KeyboardInterrupt, _Terminated):
        raise
    except Exception as exc:
        if fallback is None:
            raise
        print(f"bench: {label} FAILED: {exc}\n{traceback.format_exc(limit=3)}", file=sys.stderr, flush=True)
        fallback.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        return fallback
    print(f"bench: {label} done in {time.monotonic() - t0:.0f}s{_brief(rec)}", flush=True)
    return rec


def _brief(rec: Record) -> str:
    parts = []
    if rec.dispatch_s:
        from bench.stats import median

        parts.append(f"dispatch p50 {median(rec.dispatch_s) * 1000:.0f} ms")
    if rec.makespan_s is not None:
        parts.append(f"makespan {rec.makespan_s:.1f} s")
    if rec.pss_per_task_mb is not None:
        parts.append(f"PSS/task {rec.pss_per_task_mb:.1f} MB")
    if rec.http_requests_per_task is not None:
        parts.append(f"HTTP/task {rec.http_requests_per_task:.1f}")
    if rec.scenario == "gateway_longpoll" and rec.extra.get("wake_ms_median") is not None:
        parts.append(f"wake p50 {rec.extra['wake_ms_median']:.0f} ms")
    return (": " + ", ".join(parts)) if parts else ""


def start_deployment(
    args: argparse.Namespace, opts: Options, executors: list[str], workers: list[str], work: Path
) -> tuple[Any, Any, Any]:
    """PostgreSQL (unless --db sqlite), the stack, and the agent and edge3 worker if in ``workers``."""
    from bench.stack import BenchStack

    pg = pg_dir = None
    db_url = db_async_url = None
    if args.db == "postgres":
        from pgcluster import PgCluster

        # Not under the work dir: as root the server runs as 'postgres', which must traverse its path.
        pg_dir = tempfile.mkdtemp(prefix="edge-agent-bench-pg-")
        pg = PgCluster(pg_dir)
        pg.start()
        db_url = pg.create_database("airflow")
        db_async_url = pg.async_url("airflow")
    dag_env = {
        "BENCH_DISPATCH_TASKS": str(opts.dispatch_tasks),
        "BENCH_TRIVIAL_TASKS": str(opts.trivial_tasks),
        "BENCH_SLEEP_TASKS": str(opts.sleep_tasks),
    }
    home = work / "stack"
    stack = BenchStack(home, DAGS, concurrency=opts.concurrency, db_url=db_url, db_async_url=db_async_url,
                       edge3="edge3" in executors, local="local" in executors,
                       scheduler_parallelism=args.scheduler_parallelism, dag_env=dag_env)
    try:
        t0 = time.monotonic()
        stack.start()
        print(f"bench: hosted side up in {time.monotonic() - t0:.0f}s (logs: {stack.logs_dir})", flush=True)
        if "agent" in workers:
            stack.start_bench_agent()
        if "edge3" in workers:
            stack.start_edge3_worker()
        print(f"bench: workers up after {time.monotonic() - t0:.0f}s", flush=True)
    except BaseException:
        stack.stop()
        if pg is not None:
            pg.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
        raise
    return stack, pg, pg_dir


if __name__ == "__main__":
    sys.exit(main())
