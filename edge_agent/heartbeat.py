"""The heartbeat loop: every ``config.heartbeat_interval`` renew all held leases in one call.

It also tells the gateway our free slots, version and certificate expiry, and applies the reply:
``drain`` pauses leasing for as long as the gateway keeps saying it (maintenance: running jobs
finish, the agent stays connected; exiting would only make a service manager restart it), and
``lost`` jobs are cancelled. It keeps beating through a drain (the running jobs' leases must stay
alive) and stops last, at teardown.

During a gateway outage it keeps its cadence (the first beat after the gateway returns renews the
leases at once) but logs one warning per outage, not one per beat; the status file carries the
outage (``gateway`` with ``since``). When beats keep failing it probes whether the gateway answers
but refuses our certificate; only two positive probes in a row stop the agent, so a gateway that
goes down between the probe's two calls cannot make the agent cancel its running tasks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.errors import CertificateExpired, EdgeAgentError, GatewayUnreachable, IdentityRejected
from edge_agent.protocol import HeartbeatRequest

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

#: Consecutive unreachable heartbeats after which we check whether the gateway refuses our certificate.
PROBE_AFTER_FAILURES = 3
#: During a long outage, probe again every this many failed beats (the gateway may come back
#: refusing us, e.g. after a CA retirement).
PROBE_EVERY_FAILURES = 6


class HeartbeatLoop:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self._failures = 0
        #: The last probe said "refused": probe again at the next failure to confirm.
        self._suspect = False

    def run(self) -> None:
        a = self.agent
        while True:
            self.beat()
            with a.cond:
                if a.cond.wait_for(lambda: a.loops_stopping, timeout=a.config.heartbeat_interval):
                    break
        a.status.activity("heartbeat", "stopped")

    def beat(self) -> None:
        a = self.agent
        if a.identity.expired():
            # Checked locally: under TLS 1.3 the gateway's refusal of an expired certificate only
            # shows up as a dropped connection.
            a.fail(CertificateExpired(a.identity.cert_not_after))
            return
        request = HeartbeatRequest(
            free_slots=a.jobs.free_slots(),
            total_slots=a.config.concurrency,
            running=a.jobs.heartbeat_entries(),
            version=__version__,
            cert_not_after=a.identity.cert_not_after,
        )
        a.status.activity("heartbeat", f"renewing {len(request.running)} lease(s)")
        try:
            reply = a.api.heartbeat(request)
        except IdentityRejected as exc:
            a.status.heartbeat(False, str(exc))
            a.fail(exc)
            return
        except EdgeAgentError as exc:
            self._failures += 1
            if isinstance(exc, GatewayUnreachable) and self._probe_due():
                refused = self._certificate_refused()
                if refused and self._suspect:
                    error = IdentityRejected(
                        "the gateway answers but refuses this agent's certificate (expired, or issued by a CA it "
                        "no longer trusts): re-register with a new token"
                    )
                    a.status.heartbeat(False, str(error))
                    a.fail(error)
                    return
                self._suspect = refused
            else:
                self._suspect = False
            (log.warning if self._failures == 1 else log.debug)(
                "heartbeat failed: %s (running tasks go on; retrying every %g s)", exc, a.config.heartbeat_interval)
            a.status.heartbeat(False, str(exc))
            a.status.activity("heartbeat", f"{self._failures} heartbeat(s) failed in a row: {exc}")
            return
        if self._failures:
            log.info("heartbeat delivered again after %d failure(s)", self._failures)
            a.gateway_ok()
        self._failures = 0
        self._suspect = False
        a.status.heartbeat(True)
        a.status.activity("heartbeat", f"idle; last heartbeat renewed {len(request.running)} lease(s)")
        if reply.lost:
            a.jobs_lost(list(reply.lost), "the gateway no longer holds it for this agent")
        with a.cond:
            changed = a.server_drain != reply.drain
            a.server_drain = reply.drain
            a.cond.notify_all()
        if changed:
            log.info("the gateway %s", "asked this agent to drain: no new work until it says otherwise"
                     if reply.drain else "lifted the drain: asking for work again")

    def _probe_due(self) -> bool:
        f = self._failures
        return self._suspect or f == PROBE_AFTER_FAILURES or (
            f > PROBE_AFTER_FAILURES and (f - PROBE_AFTER_FAILURES) % PROBE_EVERY_FAILURES == 0)

    def _certificate_refused(self) -> bool:
        # Under TLS 1.3 uvicorn drops a connection whose client certificate it refuses, which looks
        # like a network failure; without this check the agent would retry forever in silence.
        from edge_agent.client import certificate_refused

        a = self.agent
        try:
            return certificate_refused(a.identity, a.config.request_timeout)
        except Exception as exc:  # a probe must never take the heartbeat loop down
            log.debug("certificate probe failed: %s", exc)
            return False


__all__ = ["HeartbeatLoop"]
