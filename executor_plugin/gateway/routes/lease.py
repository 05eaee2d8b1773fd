"""``POST /agents/v1/lease``: long-poll for one job.

The request is held until a job is leased, ``wait_seconds`` (at most
``protocol.MAX_LEASE_WAIT_SECONDS``) pass, the client goes away, or the gateway shuts down; the
reply is then ``{"lease": null}``. Between lease attempts the request waits on the process-wide
:class:`~executor_plugin.gateway.notify.LeaseNotifier`, which makes no query of its own per request.

* A draining agent is answered at once with no lease; one with no free slot is held without leasing
  (so its poll cadence stays the same).
* What may be leased is decided by ``store.lease_next`` at each attempt, from the agent row and the
  queue policies as they are then (a policy change applies to held polls too).
* A held request is woken for a new attempt when work it may take is queued, and when the notifier's
  batched re-read of the agents holding polls (every ``notify.AGENT_CHECK_SECONDS``) finds its agent
  revoked, drained, gone, or allowed other queues: a revoked agent's poll ends with 403 within
  seconds, a drained one's with no lease.
* The workload's task token is replaced by one minted now: the scheduler's may have aged in the
  queue, and a workload token only lives ``[scheduler] task_queued_timeout``.
* The lease carries the queue's log policy (``hosted`` or ``local``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.orm import Session

from edge_agent.protocol import (
    LEASE_PATH,
    MAX_LEASE_WAIT_SECONDS,
    JobState,
    Lease,
    LeaseRequest,
    LeaseResponse,
    LogPolicy,
)
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.notify import LeaseNotifier
from executor_plugin.gateway.routes import GatewayState, db, gateway_state
from executor_plugin.models import AgentStatus
from executor_plugin.policy import log_policy

log = logging.getLogger(__name__)
router = APIRouter()

def workload_token_generator():
    """The JWT generator for workload tokens, built exactly like ``BaseExecutor.jwt_generator``."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator, get_signing_args
    from airflow.configuration import conf

    return JWTGenerator(
        valid_for=conf.getint("execution_api", "jwt_expiration_time"),
        audience=conf.get_mandatory_list_value("execution_api", "jwt_audience")[0],
        issuer=conf.get("api_auth", "jwt_issuer", fallback=None),
        # Shared with the api-server that validates these tokens: never invent a key here.
        **get_signing_args(make_secret_key_if_needed=False),
    )


def _to_lease(job: store.Job, logs: str, state: GatewayState) -> Lease:
    from airflow.executors.workloads import ExecuteTask

    workload = json.loads(job.workload)
    if not isinstance(workload, dict):
        raise ValueError("workload is not a JSON object")
    workload["token"] = ExecuteTask.generate_token(str(job.ti_id), state.jwt_generator)
    assert job.lease_expires_at is not None  # set by lease_next
    return Lease(
        job_id=job.id,
        fencing=job.fencing,
        queue=job.queue,
        dag_id=job.dag_id,
        task_id=job.task_id,
        run_id=job.run_id,
        map_index=job.map_index,
        try_number=job.try_number,
        workload=workload,
        lease_expires_at=job.lease_expires_at,
        log_policy=LogPolicy(logs),
    )


def _write_log_notice(state: GatewayState, agent: store.Agent, job: store.Job, log_path: object) -> None:
    """A queue that keeps logs local: leave Airflow's log view a note of where the log is.

    Written next to where shipped chunks would go (``<log_path>.location``), which Airflow's file
    reader picks up for the try. A failure is logged and never fails the lease.
    """
    from executor_plugin.ui.log_notice import write_local_log_notice

    try:
        write_local_log_notice(
            state.settings.base_log_folder, log_path=log_path if isinstance(log_path, str) else None,
            agent_name=agent.name, agent_id=agent.id, queue=job.queue,
        )
    except (OSError, ValueError) as exc:
        log.warning("could not write the local-log notice of job %s: %s", job.id, exc)


async def _until_disconnect(request: Request) -> None:
    # The body was read already, so the server's next receive() only returns when the client
    # closes the connection (or the response completes): an abandoned poll frees its waiter at once.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class _Attempt:
    agent: store.Agent | None  # the row as it is now (None: gone)
    job: store.Job | None = None
    log_policy: str = "hosted"
    #: Queues the agent may serve now (what to wait on when nothing was leased).
    queues: tuple[str, ...] = ()


def _attempt(session: Session, agent: store.Agent, reread: bool, lease: bool, lease_ttl: timedelta) -> _Attempt:
    """One database session: try to lease (when the agent has a free slot), else re-read the agent.

    ``agent``: as the request's authentication read it. ``lease_next`` reads the agent's row as
    stored now before leasing (a revocation or drain since leases nothing), so the row is read here
    only when nothing was leased, to tell why and what to wait on; and not at all when ``reread`` is
    false (the first attempt, an instant after authentication: a revocation in between leases
    nothing, and the notifier's agent check then ends the poll).
    """
    if lease:
        job = store.lease_next(session, agent, lease_ttl=lease_ttl)
        if job is not None:
            return _Attempt(agent=agent, job=job, log_policy=log_policy(store.get_queue_policy(session, job.queue)))
    current = store.get_agent(session, agent.id) if reread else agent
    if current is None or current.state != AgentStatus.ACTIVE or not lease:
        return _Attempt(agent=current)
    return _Attempt(agent=current, queues=store.eligible_queues(session, current))


async def _wait(
    notifier: LeaseNotifier,
    agent_id: str,
    attempt: _Attempt,
    leasing: bool,
    timeout: float,
    disconnected: asyncio.Future[None],
    since: int,
) -> str:
    """``"again"`` when woken for a new attempt, ``"timeout"``, or ``"gone"`` (client left, shutdown)."""
    if disconnected.done() or notifier.closed:
        return "gone"
    waiter = asyncio.ensure_future(notifier.wait(agent_id, attempt.queues, timeout, leasing=leasing, since=since))
    done, _ = await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return "gone"
    if disconnected.done() or notifier.closed:
        # A job leased for a client that has gone would sit unseen until its lease lapses.
        return "gone"
    return "again" if waiter.result() else "timeout"


@router.post(LEASE_PATH, response_model=LeaseResponse)
async def lease(body: LeaseRequest, request: Request, agent: store.Agent = Depends(current_agent)) -> LeaseResponse:
    state = gateway_state(request)
    if agent.state != AgentStatus.ACTIVE:
        return LeaseResponse()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(body.wait_seconds, MAX_LEASE_WAIT_SECONDS)
    disconnected = asyncio.ensure_future(_until_disconnect(request))
    leasing = body.free_slots > 0
    reread = False
    try:
        while True:
            since = state.notifier.mark()
            attempt = await db(_attempt, agent, reread, leasing, state.settings.lease_ttl)
            reread = True  # every later attempt follows a wait: read the agent afresh
            if attempt.agent is None or attempt.agent.state == AgentStatus.REVOKED:
                raise HTTPException(403, f"agent {agent.id} is revoked")
            if attempt.agent.state != AgentStatus.ACTIVE:
                return LeaseResponse()
            if attempt.job is not None:
                job = attempt.job
                try:
                    leased = _to_lease(job, attempt.log_policy, state)
                except ValueError as exc:
                    # A corrupt row would otherwise be leased, fail and be retried forever.
                    log.error("job %s has an unreadable workload (%s); failing it", job.id, exc)
                    await db(
                        store.report_job, agent.id, job.id, job.fencing, JobState.FAILED.value,
                        reason=f"unreadable workload: {exc}",
                    )
                    continue
                if leased.log_policy is LogPolicy.LOCAL:
                    log_path = leased.workload.get("log_path")
                    await asyncio.to_thread(_write_log_notice, state, attempt.agent, job, log_path)
                return LeaseResponse(lease=leased)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return LeaseResponse()
            outcome = await _wait(state.notifier, agent.id, attempt, leasing, remaining, disconnected, since)
            if outcome != "again":
                return LeaseResponse()
    finally:
        disconnected.cancel()
