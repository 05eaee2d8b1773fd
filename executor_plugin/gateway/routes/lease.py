"""``POST /agents/v1/lease``: long-poll for one job.

The request is held until a job is leased, ``wait_seconds`` (at most
``protocol.MAX_LEASE_WAIT_SECONDS``) pass, the client goes away, or the gateway shuts down; the
reply is then ``{"lease": null}``. Between lease attempts the request waits on the process-wide
:class:`~executor_plugin.gateway.notify.LeaseNotifier` rather than querying on its own.

* A draining agent is answered at once with no lease; one with no free slot is held without leasing
  (so its poll cadence stays the same).
* The workload's task token is replaced by one minted now: the scheduler's may have aged in the
  queue, and a workload token only lives ``[scheduler] task_queued_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, Depends, Request

from edge_agent.protocol import LEASE_PATH, MAX_LEASE_WAIT_SECONDS, JobState, Lease, LeaseRequest, LeaseResponse
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.notify import LeaseNotifier
from executor_plugin.gateway.routes import GatewayState, db, gateway_state
from executor_plugin.models import AgentStatus

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


def _to_lease(job: store.Job, state: GatewayState) -> Lease:
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
    )


async def _until_disconnect(request: Request) -> None:
    # The body was read already, so the server's next receive() only returns when the client
    # closes the connection (or the response completes): an abandoned poll frees its waiter at once.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(
    notifier: LeaseNotifier, queues: tuple[str, ...], deadline: float, disconnected: asyncio.Future[None]
) -> bool:
    """True when woken for possible work; False on timeout, client disconnect or shutdown."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0 or disconnected.done():
        return False
    waiter = asyncio.ensure_future(notifier.wait(queues, remaining))
    done, _ = await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        # A job leased for a client that has gone would sit unseen until its lease lapses.
        return waiter.result() and not disconnected.done()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    return False


@router.post(LEASE_PATH, response_model=LeaseResponse)
async def lease(body: LeaseRequest, request: Request, agent: store.Agent = Depends(current_agent)) -> LeaseResponse:
    state = gateway_state(request)
    if agent.state != AgentStatus.ACTIVE:
        return LeaseResponse()
    deadline = asyncio.get_running_loop().time() + min(body.wait_seconds, MAX_LEASE_WAIT_SECONDS)
    disconnected = asyncio.ensure_future(_until_disconnect(request))
    try:
        if body.free_slots == 0:
            await _wait(state.notifier, (), deadline, disconnected)
            return LeaseResponse()
        while True:
            job = await db(store.lease_next, agent, lease_ttl=state.settings.lease_ttl)
            if job is not None:
                try:
                    return LeaseResponse(lease=_to_lease(job, state))
                except ValueError as exc:
                    # A corrupt row would otherwise be leased, fail and be retried forever.
                    log.error("job %s has an unreadable workload (%s); failing it", job.id, exc)
                    await db(
                        store.report_job, agent.id, job.id, job.fencing, JobState.FAILED.value,
                        reason=f"unreadable workload: {exc}",
                    )
                    continue
            if not await _wait(state.notifier, agent.queues, deadline, disconnected):
                return LeaseResponse()
    finally:
        disconnected.cancel()
