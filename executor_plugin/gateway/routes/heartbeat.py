"""``POST /agents/v1/heartbeat``: liveness, capacity, and lease renewal for the jobs an agent holds.

The reply tells the agent to drain (stop leasing, finish what it runs) and which of the jobs it
reported it no longer holds (cancelled, requeued or re-leased), so it can stop them.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from edge_agent.protocol import HEARTBEAT_PATH, HeartbeatRequest, HeartbeatResponse
from executor_plugin import store
from executor_plugin.gateway.auth import current_agent
from executor_plugin.gateway.routes import db, gateway_state
from executor_plugin.models import AgentStatus

router = APIRouter()


@router.post(HEARTBEAT_PATH, response_model=HeartbeatResponse)
async def heartbeat(
    body: HeartbeatRequest, request: Request, agent: store.Agent = Depends(current_agent)
) -> HeartbeatResponse:
    lost = await db(
        store.record_heartbeat,
        agent.id,
        free_slots=body.free_slots,
        total_slots=body.total_slots,
        version=body.version,
        cert_not_after=body.cert_not_after,
        running=[(job.job_id, job.fencing) for job in body.running],
        lease_ttl=gateway_state(request).settings.lease_ttl,
    )
    return HeartbeatResponse(drain=agent.state == AgentStatus.DRAINING, lost=lost)
