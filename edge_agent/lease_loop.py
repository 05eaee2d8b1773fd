"""The lease loop: asks the gateway for work only while there is a free slot and the agent is not stopping.

Each request is a long-poll (``config.lease_wait``): the gateway answers the moment an eligible job
exists, or with no lease when the wait ends. Each lease is judged by the local policy first
(``policy.decide``) and the decision recorded in the audit log; only an accepted one goes to the
runtime. Either way it goes into the job table (the slot is busy until the final report, REFUSED for
a refused one). It is reported RUNNING only when the runtime says the supervisor started
(``logship.py``), never here.

Nothing is leased before the log shipper tried the reports an earlier agent process left in the
spool (``Agent.replay_pending``). A failed request is retried with exponential backoff and full
jitter (1 s to 30 s), with one warning per outage.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edge_agent.backoff import Backoff
from edge_agent.errors import CertificateExpired, EdgeAgentError, IdentityRejected, RuntimeUnavailable
from edge_agent.observability import job_fields
from edge_agent.policy import decide
from edge_agent.protocol import Lease

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)


class LeaseLoop:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.backoff = Backoff(base=1.0, cap=30.0)

    def run(self) -> None:
        a = self.agent
        while True:
            if a.server_drain:
                a.status.activity("lease", "paused: the gateway asked this agent to drain")
            with a.cond:
                a.cond.wait_for(lambda: not a.leasing or (not a.server_drain and not a.replay_pending
                                                          and a.jobs.free_slots() > 0))
                if not a.leasing:
                    break
                free = a.jobs.free_slots()
            if not getattr(a.runtime, "alive", True):
                # Without this a dead zygote would only be noticed by the next lease, which then lapses.
                a.fail(RuntimeUnavailable("the task runtime stopped unexpectedly; see runtime.log in the log folder"))
                break
            a.status.activity("lease", f"waiting for work ({free} free slot{'s' if free != 1 else ''})")
            asked = time.monotonic()
            try:
                lease = a.api.lease(free, a.config.lease_wait)
            except (IdentityRejected, CertificateExpired) as exc:
                a.fail(exc)
                break
            except EdgeAgentError as exc:
                self._pause(exc)
                continue
            if self.backoff.attempt:
                log.info("lease requests answered again after %d failure(s)", self.backoff.attempt)
                a.gateway_ok()
            self.backoff.reset()
            a.status.gateway(True)
            if lease is not None:
                a.metrics.observe_lease_wait(time.monotonic() - asked)
                self._start(lease)
            elif time.monotonic() - asked < min(1.0, a.config.lease_wait / 2):
                # An empty answer long before the wait ended (a gateway that refuses to hold the
                # poll): without a pause this loop would hammer it.
                with a.cond:
                    a.cond.wait_for(lambda: not a.leasing, timeout=min(a.config.lease_wait, 5.0))
        a.status.activity("lease", "stopped: not asking for work")

    def _pause(self, exc: EdgeAgentError) -> None:
        a = self.agent
        a.status.gateway(False, str(exc))
        delay = self.backoff.next()
        # Warn on the first failure of a streak; the rest would fill the journal during an outage.
        (log.warning if self.backoff.attempt == 1 else log.debug)("lease request failed: %s", exc)
        a.status.activity("lease", f"gateway problem, asking again in {delay:.0f}s: {exc}")
        with a.cond:
            a.cond.wait_for(lambda: not a.leasing, timeout=delay)

    def _start(self, lease: Lease) -> None:
        a = self.agent
        log.info("leased job %s: %s.%s run %s try %d (fencing %d)", lease.job_id, lease.dag_id,
                 lease.task_id, lease.run_id, lease.try_number, lease.fencing, extra=job_fields(lease))
        # Decided here, before the runtime sees anything of the job.
        if not a.admit(lease, decide(a.policy, lease)):
            return
        a.status.activity("lease", f"starting job {lease.job_id}")
        assert a.runtime is not None  # loops start after the runtime
        try:
            a.runtime.submit(lease.job_id, lease.workload, str(a.socket_path))
        except Exception as exc:
            # The zygote is gone or refuses work: every further lease would fail the same way, so stop
            # the agent (a supervisor restarts it) and let this lease lapse back into the queue.
            rec = a.jobs.get(lease.job_id)
            if rec is not None:
                a.job_done(rec)
            a.fail(RuntimeUnavailable(f"the task runtime refused job {lease.job_id}: {exc}"))


__all__ = ["LeaseLoop"]
