"""The log shipper: for each held job, everything sent about it after the lease, in order.

Per job: the RUNNING report (once the runtime says the supervisor started), then the task log as
``LogChunk``s with byte offsets every ~1.5 s, then on exit the final flush (plus one line with the
runtime's reason, when it decided the outcome), and only after it the final state (success when the
supervisor exited 0, failed otherwise). One thread does all of it so
the order holds: a final state must never overtake the last log chunk, or the UI would show a
finished task with a truncated log.

While a task runs only whole lines are sent (the hosted side may parse the JSON lines at any time);
the final flush sends the rest. Chunks the gateway already has are deduplicated by offset there, so
a chunk whose reply was lost is simply sent again.

A job whose lease says ``log_policy: local`` (its queue's logs must stay in the agent's region) gets
no log chunk at all, and its final report carries no reason (a reason can quote the task's output);
its log stays in the agent's log folder. A job the local policy refused gets one report, REFUSED
with the policy's reason, and nothing else.

Every acknowledged step (RUNNING delivered, a log chunk accepted, the reason line appended) is
written through to the job's spool record (``spool.py``); the record is deleted once the final
state is delivered, or when the gateway says the job is not ours any more. Jobs replayed from the
spool at start are served first, by the same code, so their order holds across a restart too.

When the gateway fails, the shipper backs off exponentially with full jitter (1 s to 30 s); job
events do not cut the pause short (a fleet of agents must not hammer a gateway coming back), but
another loop reaching the gateway again does (``Agent.gateway_ok``). One warning per outage, not
one per attempt.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.backoff import Backoff
from edge_agent.errors import (
    CertificateExpired,
    EdgeAgentError,
    GatewayUnreachable,
    IdentityRejected,
    LogGap,
    RequestRejected,
    StaleLease,
)
from edge_agent.observability import job_fields
from edge_agent.protocol import MAX_LOG_CHUNK_BYTES, JobReport, JobState, LogChunk, LogPolicy
from edge_agent.runtime import EXIT_DUPLICATE

if TYPE_CHECKING:
    from edge_agent.agent import Agent, JobRecord

log = logging.getLogger(__name__)

#: Bytes per chunk. ``LogChunk.data`` is limited in characters; a UTF-8 character is >= 1 byte, so a
#: byte limit below the character limit always fits.
CHUNK_BYTES = min(256 * 1024, MAX_LOG_CHUNK_BYTES)
#: Chunks per job per tick while it runs, so one chatty task cannot starve the others' reports.
MAX_CHUNKS_PER_TICK = 8


class LogShipper:
    def __init__(self, agent: "Agent", interval: float = 1.5) -> None:
        self.agent = agent
        self.interval = interval
        self.backoff = Backoff(base=1.0, cap=30.0)
        #: Jobs whose log chunks the gateway refused as malformed: their state is still reported.
        self._logs_refused: set[str] = set()

    def run(self) -> None:
        a = self.agent
        delay = self.interval
        while True:
            with a.cond:
                if self.backoff.attempt:
                    a.cond.wait_for(lambda: a.loops_stopping or a.retry_reports_now, timeout=delay)
                else:
                    a.cond.wait_for(lambda: a.loops_stopping or a.jobs.dirty, timeout=delay)
                if a.loops_stopping:
                    break
                a.jobs.dirty = False
                a.retry_reports_now = False
            ok = self.tick()
            a.reports_done(ok)
            if ok:
                if self.backoff.attempt:
                    log.info("job reports delivered again after %d failed attempt(s)", self.backoff.attempt)
                self.backoff.reset()
                delay = self.interval
            else:
                # Full jitter above a floor: a pause of ~0 s would be a retry storm, not a backoff.
                delay = max(self.interval, self.backoff.next())
                a.status.activity("logship", f"gateway problem: reports wait in the spool; next try in {delay:.0f}s")
        a.status.activity("logship", "stopped")

    def tick(self) -> bool:
        """Serve every held job once; False if the gateway failed (the caller backs off)."""
        a = self.agent
        records = a.jobs.records()
        replays = sum(1 for r in records if r.replayed)
        if records:
            a.status.activity("logship", f"shipping logs and reports for {len(records)} job(s)"
                              + (f", {replays} from the spool" if replays else ""))
        else:
            a.status.activity("logship", "idle")
        ok = True
        for rec in records:
            try:
                self.serve(rec)
            except (IdentityRejected, CertificateExpired) as exc:
                a.fail(exc)
                return False
            except StaleLease as exc:
                log.warning("job %s is not this agent's any more (%s): dropping its reports", rec.job_id, exc,
                            extra=job_fields(rec.lease))
                a.jobs_lost([rec], str(exc))
                with a.cond:
                    a.jobs.dirty = True  # come back to free the slot once the job has exited
            except EdgeAgentError as exc:
                # One warning per streak; the attempts after it would fill the journal.
                (log.warning if self.backoff.attempt == 0 and ok else log.debug)(
                    "reporting job %s failed: %s; its reports wait in the spool", rec.job_id, exc)
                ok = False
                if isinstance(exc, GatewayUnreachable):
                    # Every other job would fail the same way (each after a timeout when the
                    # network blackholes): back off now.
                    a.status.gateway(False, str(exc))
                    return False
                # The gateway answered (a 5xx about this job): the other jobs' reports still go,
                # each job's own order holds because serve() stopped where this one failed.
        if records and not a.jobs.records():
            a.status.activity("logship", "idle")
        return ok

    def serve(self, rec: "JobRecord") -> None:
        a = self.agent
        with a.cond:
            lost, started, exited, running_reported = rec.lost, rec.started, rec.exited, rec.running_reported
            log_file, exit_code, reason, refused = rec.log_file, rec.exit_code, rec.reason, rec.refused
        fencing = rec.lease.fencing
        if lost:
            if exited:
                a.job_done(rec)
            return
        if refused is not None:
            self._report_refused(rec, refused)
            return
        hosted_logs = rec.lease.log_policy is not LogPolicy.LOCAL
        if started and not running_reported:
            a.api.report_state(rec.job_id, JobReport(fencing=fencing, state=JobState.RUNNING))
            with a.cond:
                rec.running_reported = True
            a.spool_save(rec, progress=True)
            a.status.gateway(True)
        if hosted_logs and log_file is not None and rec.job_id not in self._logs_refused:
            try:
                self._ship_log(rec, log_file, final=exited)
            except RequestRejected as exc:
                log.error("gateway refused log chunks of job %s (%s); its state is still reported", rec.job_id, exc,
                          extra=job_fields(rec.lease))
                self._logs_refused.add(rec.job_id)
        if exited and exit_code == EXIT_DUPLICATE:
            # The task instance already runs elsewhere (duplicate delivery): a failure report would
            # make the scheduler kill that healthy run. Report nothing; the lease lapses on its own.
            log.warning("job %s: task instance already running elsewhere; not reporting it", rec.job_id,
                        extra=job_fields(rec.lease))
            a.job_done(rec)
            return
        if exited and reason and not rec.reason_logged and hosted_logs:
            self._log_reason(rec, reason, exit_code)
        if exited:
            state = JobState.SUCCESS if exit_code == 0 else JobState.FAILED
            report = JobReport(fencing=fencing, state=state, exit_code=exit_code,
                               reason=((reason or "")[:4000] or None) if hosted_logs else None)
            try:
                a.api.report_state(rec.job_id, report)
            except RequestRejected as exc:
                log.error("gateway refused the final report of job %s: %s; giving the slot back", rec.job_id, exc,
                          extra=job_fields(rec.lease))
            else:
                log.info("job %s reported %s%s", rec.job_id, state.value, " (from the spool)" if rec.replayed else "",
                         extra=job_fields(rec.lease))
                a.status.gateway(True)
            self._logs_refused.discard(rec.job_id)
            a.job_done(rec)

    def _report_refused(self, rec: "JobRecord", reason: str) -> None:
        a = self.agent
        report = JobReport(fencing=rec.lease.fencing, state=JobState.REFUSED, reason=reason[:4000])
        try:
            a.api.report_state(rec.job_id, report)
        except RequestRejected as exc:
            log.error("gateway refused the REFUSED report of job %s: %s; giving the slot back", rec.job_id, exc,
                      extra=job_fields(rec.lease))
        else:
            log.info("job %s reported refused", rec.job_id, extra=job_fields(rec.lease))
            a.status.gateway(True)
        a.job_done(rec)

    def _log_reason(self, rec: "JobRecord", reason: str, exit_code: int | None) -> None:
        """Append the runtime's reason (job not started, cancelled, runtime lost) to the hosted log.

        Without it a task that never started has an empty log in the UI, and the reason only shows
        in this agent's own log. Sent after the final flush, at the end of what the gateway has.
        """
        a = self.agent
        line = json.dumps({
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": "error" if exit_code else "warning",
            "event": f"edge-agent {a.identity.name} ({a.identity.agent_id}): {reason}",
            "logger": "edge_agent",
        }) + "\n"
        try:
            a.api.push_logs(rec.job_id, LogChunk(fencing=rec.lease.fencing, offset=rec.log_offset, data=line))
        except (RequestRejected, LogGap) as exc:
            log.warning("could not add the reason to the log of job %s: %s", rec.job_id, exc, extra=job_fields(rec.lease))
        with a.cond:
            rec.reason_logged = True
        a.spool_save(rec)

    def _ship_log(self, rec: "JobRecord", path: Path, *, final: bool) -> None:
        a = self.agent
        sent = 0
        try:
            while final or sent < MAX_CHUNKS_PER_TICK:
                data = read_chunk(path, rec.log_offset, final=final)
                if not data:
                    return
                chunk = LogChunk(fencing=rec.lease.fencing, offset=rec.log_offset,
                                 data=data.decode("utf-8", "replace"))
                try:
                    a.api.push_logs(rec.job_id, chunk)
                except LogGap as gap:
                    if not 0 <= gap.size < rec.log_offset:
                        raise
                    # The gateway lost the tail of its copy (another gateway host, a cleaned log
                    # folder): send again from where its copy ends.
                    log.warning("job %s: gateway has %d bytes of the log, resending from there", rec.job_id,
                                gap.size, extra=job_fields(rec.lease))
                    with a.cond:
                        rec.log_offset = gap.size
                else:
                    with a.cond:
                        rec.log_offset += len(data)
                sent += 1
        finally:
            # The cursor on disk, once per pass rather than per chunk: after a restart the log goes
            # on from here (a cursor behind the gateway's copy is harmless, the gateway skips bytes
            # it has).
            if sent:
                a.spool_save(rec, progress=True)


def read_chunk(path: Path, offset: int, *, final: bool) -> bytes:
    """The next bytes to ship from ``offset``: whole lines while the task runs, everything when final."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(CHUNK_BYTES)
    except FileNotFoundError:
        return b""  # the supervisor has not created it yet
    if not data:
        return b""
    if len(data) == CHUNK_BYTES or not final:
        cut = data.rfind(b"\n") + 1
        if cut:
            return data[:cut]
        if len(data) < CHUNK_BYTES:
            return b""  # an unfinished line: wait for its end (or for the final flush)
        # One line longer than a chunk: cut it, but not inside a UTF-8 sequence.
        return data[: _utf8_boundary(data)]
    return data


def _utf8_boundary(data: bytes) -> int:
    end = len(data)
    for back in range(0, 4):
        try:
            data[: end - back].decode("utf-8")
            return end - back
        except UnicodeDecodeError:
            continue
    return end  # not UTF-8 at all: send as is (decoded with replacement characters)


__all__ = ["LogShipper", "read_chunk"]
