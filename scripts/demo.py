"""`make demo`: a whole edge-agent deployment on this machine, one DAG run through an agent, then stop.

Steps: fresh ``.demo/`` directory; hosted side (``airflow db migrate``, ``airflow edge-agents ca
init``, api-server, scheduler, dag-processor, triggerer, gateway); a one-time registration token;
``edge-agent register`` over TLS pinned to the CA; ``edge-agent run``; trigger ``edge_agent_demo``;
print each task's state, where it ran, how long it waited from queued to started and how long it
ran; stop all.

Ctrl-C (or SIGTERM) at any point stops every process the demo started. ``--keep-running`` leaves
the stack up after the run, for the UI, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localstack import EXECUTOR_NAME, LocalStack, StackError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_HOME = ROOT / ".demo"
DAGS = ROOT / "examples" / "dags"
DAG_ID = "edge_agent_demo"
AGENT_NAME = "demo-agent"
QUEUE = "default"
REGION = "demo-1"

# Piped output (CI logs, `| tee`) would otherwise be cut to 80 columns and wrap the table.
console = Console(width=None if sys.stdout.isatty() else 120)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C: unwind into the finally that stops the stack.
    raise KeyboardInterrupt


def _step(text: str) -> float:
    console.print(f"[bold cyan]==>[/] {text}")
    return time.monotonic()


def _done(started: float, detail: str = "") -> None:
    console.print(f"    done in {time.monotonic() - started:.1f}s {detail}")


def _fresh_home() -> None:
    # Only ever this one directory: a second `make demo` must start from nothing, like the first.
    if DEMO_HOME.exists():
        shutil.rmtree(DEMO_HOME)
    DEMO_HOME.mkdir()


def _results_table(stack: LocalStack, run_id: str, agent_id: str) -> Table:
    names = stack.agent_names()
    jobs = {(j["task_id"], j["map_index"], j["try_number"]): j for j in stack.agent_jobs(DAG_ID, run_id)}
    table = Table(title=f"{DAG_ID} / {run_id}")
    # "queued -> started": the TI's queued_when to the start time the task's supervisor reported;
    # "duration": start to end, so a slow first call to a cold Execution API shows up there.
    for column in ("task", "state", "executor", "ran on", "queued -> started (s)", "duration (s)"):
        table.add_column(column)
    for ti in stack.task_instances(DAG_ID, run_id):
        if ti.executor == EXECUTOR_NAME:
            job = jobs.get((ti.task_id, ti.map_index, ti.try_number))
            ran_on_id = (job or {}).get("agent_id") or agent_id
            ran_on = f"agent {names.get(ran_on_id, ran_on_id)} ({ran_on_id})"
        else:
            ran_on = "hosted (scheduler's LocalExecutor)"
        wait = ti.queued_to_start
        took = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else None
        table.add_row(
            ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]",
            ti.state or "-",
            ti.executor or "-",
            ran_on,
            f"{wait:.2f}" if wait is not None else "-",
            f"{took:.2f}" if took is not None else "-",
        )
    return table


def _where_to_look(stack: LocalStack, keep_running: bool) -> None:
    console.print("\n[bold]Where to look[/]")
    if keep_running:
        console.print(f"  UI (no login):     {stack.api_url}/dags/{DAG_ID}")
    else:
        console.print("  UI:                stopped with the demo; run `make demo ARGS=--keep-running` to browse it")
    console.print(f"  component logs:    {stack.logs_dir}/<api-server|scheduler|dag-processor|triggerer|gateway>.log")
    console.print(f"  agent log:         {stack.logs_dir}/agent-{AGENT_NAME}.log")
    console.print(f"  task logs (hosted):{stack.task_logs_dir}")
    console.print(f"  agent state dir:   {stack.home / 'agents' / AGENT_NAME / 'state'} (identity, 0600)")
    console.print(f"  admin CLI:         source {stack.home / 'stack.env'} && airflow edge-agents list")


def run_demo(keep_running: bool) -> int:
    _fresh_home()
    stack = LocalStack(DEMO_HOME, DAGS)
    try:
        t = _step("starting the hosted side (db migrate, CA, api-server, scheduler, dag-processor, "
                  "triggerer, gateway); about a minute")
        stack.start()
        _done(t, f"api-server {stack.api_url}, gateway {stack.gateway_url}")

        t = _step(f"minting a one-time token (queue {QUEUE}, region {REGION}), registering '{AGENT_NAME}' "
                  "over TLS pinned to the CA, starting `edge-agent run`")
        agent = stack.start_agent(AGENT_NAME, [QUEUE], REGION, concurrency=2)
        _done(t, f"agent id {agent.agent_id}")

        t = _step("what the server bound to the agent (`airflow edge-agents list --json`)")
        for row in stack.list_agents():
            console.print(f"    {row}")
        _done(t)

        t = _step(f"triggering {DAG_ID}: extract (agent) -> summarise (hosted) -> load (agent)")
        run_id = stack.trigger(DAG_ID)
        state = stack.wait_run(DAG_ID, run_id, timeout=300)
        _done(t, f"run {state}")

        console.print(_results_table(stack, run_id, agent.agent_id))
        summary = stack.xcom(DAG_ID, run_id, "summarise")
        console.print(f"summarise returned {summary!r} (computed on the hosted side from the agent's XCom)")
        _where_to_look(stack, keep_running)
        if keep_running:
            console.print("\n[bold]Stack is up. Press Ctrl-C to stop everything.[/]")
            threading.Event().wait()
        return 0 if state == "success" else 1
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/]")
        return 130
    except StackError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        console.print(f"logs: {stack.logs_dir}")
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave components running (it is
        # bounded: SIGKILL follows SIGTERM after a grace period).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        t = _step("stopping every process the demo started (up to ~30 s)")
        stack.stop()
        _done(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up after the run, until Ctrl-C")
    args = parser.parse_args()
    # Started in the background by a non-interactive shell, Python inherits SIGINT ignored: make
    # Ctrl-C / SIGINT always mean "stop the demo", like SIGTERM.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run_demo(args.keep_running)


if __name__ == "__main__":
    sys.exit(main())
