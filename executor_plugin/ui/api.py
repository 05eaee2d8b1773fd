"""The Edge agents REST API (``/edge-agents/api/v1``): list, explain, drain, resume, revoke.

Every route depends on :mod:`executor_plugin.ui.auth` (Airflow's authentication; reading needs the
Jobs view, changes need configuration write access). Handlers are plain functions that FastAPI runs
in its thread pool; each opens one session from the app's session factory, calls the store or
:mod:`executor_plugin.explain`, and answers JSON. Errors are ``{"detail": "<one sentence>"}``.

Changes are recorded in Airflow's audit log (the ``log`` table, event ``edge_agents.<action>``), as
the CLI commands record theirs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, Request, status

from executor_plugin.ui.auth import Manager, Reader, may_manage, may_read_task_instances

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from executor_plugin.ui.app import UIContext

router = APIRouter()


def _ctx(request: Request) -> UIContext:
    return request.app.state.edge_agents


def _user_name(user: Any) -> str:
    try:
        return str(user.get_name())
    except Exception:  # an auth manager's user without a name must not break the page
        return "unknown"


@router.get("/me")
def me(user: Reader) -> dict[str, Any]:
    """Who is asking, and whether the page should offer drain/resume/revoke."""
    return {"user": _user_name(user), "can_manage": may_manage(user)}


@router.get("/agents")
def list_agents(request: Request, user: Reader) -> dict[str, Any]:
    """Every agent (queues, region, state, slots, running jobs, heartbeat, version, certificate)
    and every queue (jobs by state, agents online, free slots, lease latency)."""
    from executor_plugin.ui.fleet import snapshot

    ctx = _ctx(request)
    with ctx.sessions() as session:
        data = snapshot(session, window=ctx.config().dead_after).to_dict()
    return {**data, "can_manage": may_manage(user)}


@router.get("/agents/{agent_id}")
def get_agent(agent_id: str, request: Request, user: Reader) -> dict[str, Any]:
    from executor_plugin import store
    from executor_plugin.ui.fleet import agent_rows, to_json

    ctx = _ctx(request)
    with ctx.sessions() as session:
        agent = store.get_agent(session, agent_id)
        running = store.running_job_counts(session) if agent is not None else {}
    if agent is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no agent {agent_id!r}")
    [row] = agent_rows([agent], running, now=store.utcnow(), window=ctx.config().dead_after)
    return to_json(row)


def _change(
    request: Request, user: Any, agent_id: str, action: str, change: Callable[[Session, str], Any]
) -> tuple[Any, dict[str, Any]]:
    """Apply ``change`` to one agent, record it in Airflow's audit log, return (result, agent row)."""
    from airflow.models.log import Log

    from executor_plugin import store
    from executor_plugin.ui.fleet import agent_rows, to_json

    ctx = _ctx(request)
    with ctx.sessions() as session:
        try:
            result = change(session, agent_id)
        except store.AgentNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no agent {agent_id!r}") from None
        except store.AgentRevoked:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"agent {agent_id} is revoked: register a new agent instead"
            ) from None
        session.add(
            Log(
                event=f"edge_agents.{action}",
                owner=_user_name(user),
                owner_display_name=_user_name(user),
                extra=json.dumps({"agent_id": agent_id, "via": "edge-agents page/API"}),
            )
        )
        agent = result.agent if isinstance(result, store.Revocation) else result  # the row after the change
        running = store.running_job_counts(session)
    [row] = agent_rows([agent], running, now=store.utcnow(), window=ctx.config().dead_after)
    return result, to_json(row)


@router.post("/agents/{agent_id}/drain")
def drain(agent_id: str, request: Request, user: Manager) -> dict[str, Any]:
    from executor_plugin import store

    _, row = _change(request, user, agent_id, "drain", store.drain_agent)
    return {
        "agent": row,
        "message": f"agent {row['name']} is draining: it gets no new jobs and finishes what it runs",
    }


@router.post("/agents/{agent_id}/resume")
def resume(agent_id: str, request: Request, user: Manager) -> dict[str, Any]:
    from executor_plugin import store

    _, row = _change(request, user, agent_id, "resume", store.resume_agent)
    return {"agent": row, "message": f"agent {row['name']} is active again"}


@router.post("/agents/{agent_id}/revoke")
def revoke(agent_id: str, request: Request, user: Manager) -> dict[str, Any]:
    from executor_plugin import store

    revocation, row = _change(request, user, agent_id, "revoke", store.revoke_agent)
    message = f"agent {row['name']} is revoked: every request with its certificate is refused from now on"
    if revocation.requeued:
        message += f"; {revocation.requeued} leased job(s) went back to the queue"
    if revocation.running:
        message += f"; {len(revocation.running)} running job(s) fail when Airflow's task heartbeat times out"
    return {
        "agent": row,
        "requeued_jobs": revocation.requeued,
        "running_jobs": list(revocation.running),
        "message": message,
    }


def _team_name(session: Session, dag_id: str) -> str | None:
    from airflow.configuration import conf

    if not conf.getboolean("core", "multi_team", fallback=False):
        return None
    from airflow.models.dag import DagModel

    return DagModel.get_team_name(dag_id, session=session)


@router.get("/explain")
def explain(
    request: Request,
    user: Reader,
    dag_id: str = Query(min_length=1, max_length=250),
    task_id: str = Query(min_length=1, max_length=250),
    run_id: str = Query(min_length=1, max_length=250),
    map_index: int = Query(-1, ge=-1),
    try_number: int | None = Query(None, ge=0),
) -> dict[str, Any]:
    """Every agent and why it can or cannot take this task instance now, plus its job's state."""
    from executor_plugin.explain import TaskNotFound, TaskRef, gather

    ctx = _ctx(request)
    config = ctx.config()
    with ctx.sessions() as session:
        if not may_read_task_instances(user, dag_id, _team_name(session, dag_id)):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: no read access to the task instances of {dag_id}")
        try:
            result = gather(
                session,
                TaskRef(dag_id, task_id, run_id, map_index, try_number),
                configured_executors=config.executors,
                window=config.dead_after,
            )
        except TaskNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return result.to_dict()


__all__ = ["router"]
