"""``airflow edge-agents explain DAG_ID TASK_ID RUN_ID``: which agents can take a task, and why not.

    airflow edge-agents explain DAG_ID TASK_ID RUN_ID [--map-index N] [--try N] [--json]

Prints the task instance's queue and its policy, the state of the try's job (queued since...,
running on..., failed: reason), then one line per agent: can it take the task now, and every reason
it cannot (queue not granted, region excluded, refused by its local policy, draining, offline,
revoked, no free slots). The decision is :func:`executor_plugin.explain.explain`, the same one the
Edge agents page shows.

``executor_plugin.cli`` registers :data:`EXPLAIN_COMMAND`; at import time this module only builds
the argparse description (Airflow imports the CLI description in every ``airflow`` command).
Errors follow ``cli``'s convention: one ``error: ...`` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from airflow.cli.cli_config import ActionCommand, Arg

if TYPE_CHECKING:
    import argparse

    from executor_plugin.explain import Explanation


def _int_option(text: str | None, name: str, minimum: int) -> int | None:
    from executor_plugin.cli import UsageError

    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got {text!r}") from None
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    return value


def render_text(result: Explanation) -> str:
    """The human-readable answer (what the command prints without ``--json``)."""
    task = result.task
    where = f"{task.dag_id} / {task.run_id} / {task.task_id}" + (f" [{task.map_index}]" if task.map_index >= 0 else "")
    regions = ", ".join(result.regions) if result.regions is not None else "any"
    lines = [
        f"task instance: {where}, try {task.try_number if task.try_number is not None else 'none'}, "
        f"state {result.ti_state or 'unknown'}, executor {result.executor or '(default)'}",
        f"queue:         {result.queue} (regions {regions}; logs {result.logs})",
        f"job:           {result.job_status}",
        f"verdict:       {result.summary}",
        "",
    ]
    if not result.agents:
        lines.append("No agent is registered. Mint a token with 'airflow edge-agents token create'.")
        return "\n".join(lines)
    width = max(len(v.name) for v in result.agents)
    for verdict in result.agents:
        answer = "HOLDS IT" if verdict.holds_job else ("CAN" if verdict.can_take else "CANNOT")
        lines.append(f"{answer:<8} {verdict.name:<{width}}  {verdict.agent_id}  ({verdict.region}, {verdict.state})")
        for reason in verdict.reasons:
            lines.append(f"{'':<8} - {reason.code}: {reason.message}")
    return "\n".join(lines)


def _explain(args: argparse.Namespace) -> None:
    from airflow.configuration import conf
    from airflow.utils.session import create_session

    from executor_plugin.cli import UsageError
    from executor_plugin.explain import TaskNotFound, TaskRef, gather
    from executor_plugin.settings import agent_dead_after_from_conf

    ref = TaskRef(
        dag_id=args.dag_id,
        task_id=args.task_id,
        run_id=args.run_id,
        map_index=_int_option(args.map_index, "--map-index", -1),  # type: ignore[arg-type]
        try_number=_int_option(args.try_number, "--try", 1),
    )
    with create_session(scoped=False) as session:
        try:
            result = gather(
                session,
                ref,
                configured_executors=conf.get("core", "executor"),
                window=agent_dead_after_from_conf(),
            )
        except TaskNotFound as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render_text(result))
    sys.stdout.flush()


def explain_command(args: argparse.Namespace) -> None:
    """Run the command with ``cli``'s one-line error handling (imported late: ``cli`` imports us)."""
    from executor_plugin.cli import _one_line_errors

    _one_line_errors(_explain)(args)


ARG_DAG_ID = Arg(("dag_id",), help="DAG id", metavar="DAG_ID")
ARG_TASK_ID = Arg(("task_id",), help="Task id", metavar="TASK_ID")
ARG_RUN_ID = Arg(("run_id",), help="DAG run id", metavar="RUN_ID")
ARG_MAP_INDEX = Arg(("--map-index",), help="Map index of a mapped task (default -1: not mapped)", default="-1")
ARG_TRY = Arg(("--try",), dest="try_number", help="Try number to explain (default: the current try)")
ARG_JSON = Arg(("--json",), help="Print JSON instead of text", action="store_true")
ARG_VERBOSE = Arg(("-v", "--verbose"), help="Show the traceback of an unexpected error", action="store_true")

EXPLAIN_COMMAND = ActionCommand(
    name="explain",
    help="Explain which agents can take a task instance, and why the others cannot",
    description=(
        "For one task instance, list every agent and whether it can take the task now; for each one "
        "that cannot, every reason: queue not granted, region excluded by the queue's policy, refused "
        "by the agent's local policy, draining, offline, revoked, no free slots. Also shows the state "
        "of the try's job."
    ),
    func=explain_command,
    args=(ARG_DAG_ID, ARG_TASK_ID, ARG_RUN_ID, ARG_MAP_INDEX, ARG_TRY, ARG_JSON, ARG_VERBOSE),
)

__all__ = ["EXPLAIN_COMMAND", "explain_command", "render_text"]
