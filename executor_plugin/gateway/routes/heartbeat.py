"""``POST /agents/v1/heartbeat``: liveness, capacity, and lease renewal for the jobs an agent holds.

The reply tells the agent to drain (stop leasing, finish what it runs) and which of the jobs it
reported it no longer holds (cancelled, requeued or re-leased), so it can stop them. ``drain``
comes from the agent row as read for this very request (``current_agent`` reads it fresh), so
``airflow edge-agents drain``/``resume`` apply at the agent's next heartbeat. An agent coming back
after the executor declared it offline finds its requeued jobs in ``lost``: their fencing id was
bumped, so they no longer match what it holds.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request

from edge_agent.protocol import HEARTBEAT_PATH, HeartbeatRequest, HeartbeatResponse
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.routes import db, gateway_state
from executor_plugin.models import AgentStatus

log = logging.getLogger(__name__)

router = APIRouter()


@router.post(HEARTBEAT_PATH, response_model=HeartbeatResponse)
async def heartbeat(
    body: HeartbeatRequest, request: Request, agent: store.Agent = Depends(current_agent)
) -> HeartbeatResponse:
    settings = gateway_state(request).settings
    lost = await db(
        store.record_heartbeat,
        agent.id,
        free_slots=body.free_slots,
        total_slots=body.total_slots,
        version=body.version,
        cert_not_after=body.cert_not_after,
        running=[(job.job_id, job.fencing) for job in body.running],
        lease_ttl=settings.lease_ttl,
    )
    now = store.utcnow()
    silent_for = agent.heartbeat_age(now)  # the row as read before this heartbeat was recorded
    if silent_for is not None and not agent.is_online(settings.agent_dead_after, now):
        # The executor may have requeued what it had leased meanwhile; `lost` tells it which.
        log.info(
            "Agent %s (%s) is back after %.0f s without a heartbeat; %d job(s) it reported are no longer its own",
            agent.name, agent.id, silent_for, len(lost),
        )
    return HeartbeatResponse(drain=agent.state == AgentStatus.DRAINING, lost=lost)
