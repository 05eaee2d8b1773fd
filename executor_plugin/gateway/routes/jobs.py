"""``POST /agents/v1/jobs/{id}/state`` and ``/logs``: what an agent says about a job it holds.

Both present the job's fencing id: a job that is not this agent's answers 404, a stale fencing id
(the lease lapsed and the job moved on) answers 409.

A ``refused`` report (the agent's local policy refused a leased job, which never ran) is recorded by
``store.refuse_job``: the job goes back to the queue for other agents, or fails with the reason when
no other agent could take it; a repeat of the same report is accepted again.

Log chunks of a job whose queue policy keeps logs in the agent's region (``logs = local``) are
refused with 403, whatever the lease said: an agent that ships them anyway is misbehaving, and the
hosted side must never store them.

Log chunks are appended to ``{base_log_folder}/{workload.log_path}``, where Airflow's UI reads task
logs. Each chunk carries its byte offset in the agent's log file, so a resent chunk (its response
was lost) is not written twice: the part the file already has is skipped, and a chunk starting past
the end of the file (an earlier chunk is missing) is refused with 409 so the agent resends from the
file's size.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edge_agent.protocol import JobReport, LogChunk, job_logs_path, job_state_path
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.routes import db, gateway_state
from executor_plugin.policy import LOGS_LOCAL, log_policy

router = APIRouter()

LOGS_STAY_LOCAL = "this job's queue policy keeps task logs in the agent's region: do not ship them"


class LogsStayLocal(Exception):
    pass


class LogGap(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _job_errors(exc: store.StoreError) -> HTTPException:
    if isinstance(exc, store.StaleFencing):
        return HTTPException(409, "stale fencing id: this job's lease ended or moved to another lease")
    return HTTPException(404, "no such job held by this agent")


@router.post(job_state_path("{job_id}"), status_code=204, response_class=Response)
async def report_state(
    job_id: str, body: JobReport, agent: store.Agent = Depends(current_agent)
) -> Response:
    try:
        await db(
            store.report_job,
            agent.id,
            job_id,
            body.fencing,
            body.state.value,
            exit_code=body.exit_code,
            reason=body.reason,
        )
    except (store.JobNotFound, store.StaleFencing) as exc:
        raise _job_errors(exc) from None
    return Response(status_code=204)


def _log_target(session: Session, agent_id: str, job_id: str, fencing: int, base: Path) -> Path | None:
    job = store.job_for_agent(session, agent_id, job_id, fencing)
    if log_policy(store.get_queue_policy(session, job.queue)) == LOGS_LOCAL:
        raise LogsStayLocal(job_id)
    try:
        log_path = json.loads(job.workload).get("log_path")
    except (ValueError, AttributeError):
        return None
    if not log_path:
        return None
    target = (base / log_path).resolve()
    # The workload is ours, but a path escaping the log folder must never be written to.
    if not target.is_relative_to(base.resolve()):
        return None
    return target


def append_at_offset(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` so that it lands at byte ``offset`` of ``path``, skipping what is there already.

    An exclusive ``flock`` makes the size check and the append one step, also across gateway
    processes. Raises :class:`LogGap` when the file is shorter than ``offset``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if offset > size:
            raise LogGap(size)
        fresh = data[size - offset :]
        while fresh:
            written = os.write(fd, fresh)
            fresh = fresh[written:]
    finally:
        os.close(fd)


@router.post(job_logs_path("{job_id}"), status_code=204, response_class=Response)
async def append_logs(
    job_id: str, body: LogChunk, request: Request, agent: store.Agent = Depends(current_agent)
) -> Response:
    base = gateway_state(request).settings.base_log_folder
    try:
        target = await db(_log_target, agent.id, job_id, body.fencing, base)
    except (store.JobNotFound, store.StaleFencing) as exc:
        raise _job_errors(exc) from None
    except LogsStayLocal:
        raise HTTPException(403, LOGS_STAY_LOCAL) from None
    if target is None:
        # Nowhere to put it (the workload names no log file): accept and drop, the task still runs.
        return Response(status_code=204)
    try:
        await run_in_threadpool(append_at_offset, target, body.offset, body.data.encode("utf-8"))
    except LogGap as gap:
        raise HTTPException(409, f"log chunk starts at byte {body.offset} but the log has {gap.size} bytes") from None
    return Response(status_code=204)
