"""``Agent``: the control process's lifecycle. Starts the forwarder, the runtime and the loops; stops them.

Threads (each loop in its own module, one cadence each)::

    main         run(): waits for a stop request, then drains or cancels, then tears down
    lease        lease_loop.LeaseLoop   asks for work while there are free slots and we are not stopping
    logship      logship.LogShipper     per job: RUNNING report, log chunks, final flush, final state
    heartbeat    heartbeat.HeartbeatLoop renews every held lease in one call; runs through the drain
    rotation     rotation.RotationLoop   renews the certificate at 70-90 % of its lifetime (needs a keystore)
    (runtime)    the runtime's reader thread calls _on_started/_on_exited

Every lease is judged by the local policy (``policy.decide``) before anything reaches the runtime;
the decision, every job's start (with the supervisor's pid), Airflow's acceptance of its ``/run``
(seen in the forwarder) and every job's end go to the audit log (``audit.py``). A refused job holds its slot only until its REFUSED report is delivered.

Everything still to tell the gateway about a job is kept in the disk spool (``spool.py``), written
at each transition here and at each acknowledged log chunk by the log shipper; the spool is
replayed at start, before leasing, without holding task slots. So a gateway outage of any length
costs no report: running tasks go on, their reports wait on disk.

Stops, idempotent and escalating (``signals.py`` maps SIGTERM/SIGINT #1, #2, #3 onto them):
``stop_gracefully`` = stop leasing, let running jobs finish and report them, exit 0; past
``drain_grace`` seconds it turns into a cancel. ``stop_now`` = cancel running jobs through the
runtime (reported FAILED with the reason), wait ``cancel_grace`` for them, exit 0. A drain or cancel
whose reports cannot be delivered (gateway away) ends once the tasks have ended and their reports
are spooled. ``abort`` = leave at once. A drain asked by the server in a heartbeat reply only
pauses leasing (``heartbeat.py``).

All shared state sits behind one ``Condition`` over an *RLock*: a signal handler runs on the main
thread, possibly while that thread holds the lock, and must be able to re-enter it to set state.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from edge_agent import statelock
from edge_agent.audit import AuditLog
from edge_agent.config import AgentConfig
from edge_agent.errors import AuditError, CertificateExpired, ConfigError, EdgeAgentError, IdentityRejected
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.observability import job_fields
from edge_agent.observability.endpoint import Check
from edge_agent.observability.metrics import Metrics
from edge_agent.observability.status import StatusBoard
from edge_agent.policy import Decision, Policy, facts
from edge_agent.protocol import RUN_PATH, Lease, LogPolicy, RunningJob
from edge_agent.runtime import EXIT_RUNTIME_LOST
from edge_agent.sdnotify import Notifier, Watchdog
from edge_agent.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)

#: After the cancel grace, how long to wait for the killed tasks' exits to be reported.
CANCEL_REPORT_MARGIN = 5.0
#: At teardown, how long to wait for a loop stuck in a request: its job states are in the spool,
#: so a short wait costs nothing but a resend at the next start, and it keeps a stop inside the
#: service manager's stop timeout (drain grace + cancel grace + this must fit in TimeoutStopSec).
TEARDOWN_JOIN_SECONDS = 5.0

# The forwarder's callable types, restated so importing this module does not load the forwarder.
SendFn = Callable[[str, str, dict, bytes], "tuple[int, dict, bytes]"]
AfterReplyFn = Callable[[str, str, int], None]


class RuntimeLike(Protocol):
    def start(self) -> None: ...
    def submit(self, job_id: str, workload: dict, socket_path: str) -> None: ...
    def cancel(self, job_id: str, reason: str, grace: float | None = None) -> object: ...
    def stop(self) -> None: ...


class ForwarderLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Phase(str, enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    CANCELLING = "cancelling"
    FAILED = "failed"
    STOPPED = "stopped"


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """One leased job, from lease to final report. Mutated only under the agent's condition."""

    lease: Lease
    leased_at: str = field(default_factory=_utcnow)
    pid: int | None = None
    log_file: Path | None = None
    started_at: str | None = None
    running_reported: bool = False
    exited: bool = False
    exit_code: int | None = None
    reason: str | None = None
    #: Bytes of the log file already accepted by the gateway.
    log_offset: int = 0
    #: The gateway no longer holds this job for us: report nothing more, cancel it if it runs.
    lost: bool = False
    #: The runtime's reason for the outcome was appended to the hosted copy of the task log.
    reason_logged: bool = False
    #: Why the local policy refused the job (it never reached the runtime); reported as REFUSED.
    refused: str | None = None
    #: Loaded from the spool at start: its task ended under an earlier agent process; holds no slot.
    replayed: bool = False
    #: The spool holds this record's latest state (False while a write is due or after it failed).
    spooled: bool = False
    #: Version of the state last handed to the spool (bumped under the agent's condition).
    spool_seq: int = 0
    spooled_at: str | None = None

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    @property
    def started(self) -> bool:
        return self.started_at is not None

    def to_spool(self, agent_id: str) -> SpoolEntry:
        """What the spool keeps of this record: no workload (it holds the task token)."""
        lease = self.lease
        job, _ = facts(lease)
        return SpoolEntry(
            job_id=lease.job_id, fencing=lease.fencing, agent_id=agent_id, queue=lease.queue,
            dag_id=lease.dag_id, task_id=lease.task_id, run_id=lease.run_id, map_index=lease.map_index,
            try_number=lease.try_number, bundle=job.bundle, log_policy=lease.log_policy.value,
            leased_at=self.leased_at, spooled_at=self.spooled_at or _utcnow(), started_at=self.started_at,
            pid=self.pid, running_reported=self.running_reported,
            log_file=str(self.log_file) if self.log_file is not None else None, log_offset=self.log_offset,
            reason_logged=self.reason_logged, exited=self.exited, exit_code=self.exit_code, reason=self.reason,
            refused=self.refused,
        )

    @classmethod
    def from_spool(cls, entry: SpoolEntry, seq: int) -> "JobRecord":
        """A record replayed from the spool (its lease carries no workload, only the task's identity)."""
        ti = {"dag_id": entry.dag_id, "task_id": entry.task_id, "run_id": entry.run_id,
              "map_index": entry.map_index, "try_number": entry.try_number, "queue": entry.queue}
        workload: dict[str, Any] = {"ti": ti}
        if entry.bundle is not None:
            workload["bundle_info"] = {"name": entry.bundle}
        lease = Lease(
            job_id=entry.job_id, fencing=entry.fencing, queue=entry.queue, dag_id=entry.dag_id,
            task_id=entry.task_id, run_id=entry.run_id, map_index=entry.map_index, try_number=entry.try_number,
            workload=workload, lease_expires_at=datetime.fromtimestamp(0, timezone.utc),
            log_policy=LogPolicy(entry.log_policy),
        )
        return cls(
            lease=lease, leased_at=entry.leased_at, pid=entry.pid,
            log_file=Path(entry.log_file) if entry.log_file else None, started_at=entry.started_at,
            running_reported=entry.running_reported, exited=entry.exited, exit_code=entry.exit_code,
            reason=entry.reason, log_offset=entry.log_offset, reason_logged=entry.reason_logged,
            refused=entry.refused, replayed=True, spooled=True, spool_seq=seq, spooled_at=entry.spooled_at,
        )

    def summary(self) -> dict[str, Any]:
        lease = self.lease
        phase = ("spooled" if self.replayed else "refused" if self.refused is not None else "lost" if self.lost
                 else "exited" if self.exited else "running" if self.started else "starting")
        return {
            "job_id": lease.job_id, "dag_id": lease.dag_id, "task_id": lease.task_id, "run_id": lease.run_id,
            "map_index": lease.map_index, "try_number": lease.try_number, "queue": lease.queue, "phase": phase,
            "pid": self.pid, "leased_at": self.leased_at, "started_at": self.started_at,
            "exit_code": self.exit_code, "logs": lease.log_policy.value,
        }


class JobTable:
    """The jobs this agent holds (a slot is busy from lease until the final report is delivered).

    Jobs replayed from the spool are held apart: they are served like the others (and first) but
    hold no slot and get no heartbeat (their tasks ended under an earlier agent process).
    """

    def __init__(self, cond: threading.Condition, capacity: int) -> None:
        self._cond = cond
        self.capacity = capacity
        self._jobs: dict[str, JobRecord] = {}
        self._replay: dict[str, JobRecord] = {}
        self._closed = False
        #: Set when a job started or exited: the log shipper has reports to send.
        self.dirty = False

    def free_slots(self) -> int:
        with self._cond:
            return max(0, self.capacity - len(self._jobs))

    def add(self, lease: Lease, refused: str | None = None) -> bool:
        """Hold a new lease; False once the agent decided to exit (the lease then lapses and is requeued).

        A refused job is held as already exited (it never runs) until its REFUSED report is delivered.
        A replayed record of the same job is dropped: the gateway leased the job again, so the old
        lease's reports would be refused as stale anyway.
        """
        with self._cond:
            if self._closed:
                return False
            self._replay.pop(lease.job_id, None)
            self._jobs[lease.job_id] = JobRecord(lease=lease, refused=refused, exited=refused is not None)
            self.dirty = True
            self._cond.notify_all()
            return True

    def add_replayed(self, rec: JobRecord) -> None:
        with self._cond:
            self._replay[rec.job_id] = rec
            self.dirty = True
            self._cond.notify_all()

    def get(self, job_id: str) -> JobRecord | None:
        """The live record of a job (one the runtime knows), not a replayed one."""
        with self._cond:
            return self._jobs.get(job_id)

    def remove(self, rec: JobRecord) -> None:
        """Forget ``rec`` (live or replayed); a newer record of the same job stays."""
        with self._cond:
            for table in (self._jobs, self._replay):
                if table.get(rec.job_id) is rec:
                    del table[rec.job_id]
                    break
            self._cond.notify_all()

    def records(self) -> list[JobRecord]:
        """Replayed records first (oldest first), then the live ones: the spool is replayed before new work."""
        with self._cond:
            return [*self._replay.values(), *self._jobs.values()]

    def __len__(self) -> int:
        """Live jobs (the ones holding slots)."""
        with self._cond:
            return len(self._jobs)

    def __iter__(self) -> Iterator[JobRecord]:
        return iter(self.records())

    def all_exited(self) -> bool:
        with self._cond:
            return all(r.exited for r in self.records())

    def close_if_settled(self, reports_blocked: bool) -> bool:
        """Atomically: if nothing more can happen here, refuse new jobs from now on and return True.

        Settled = no record left, or (the gateway is failing our reports) every task has ended and
        its reports are in the spool for the next start. Without the second case a drain during a
        gateway outage would never end.
        """
        with self._cond:
            recs = self.records()
            if not recs or (reports_blocked and all(r.exited and (r.spooled or r.lost) for r in recs)):
                self._closed = True
            return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def heartbeat_entries(self) -> list[RunningJob]:
        with self._cond:
            return [RunningJob(job_id=r.job_id, fencing=r.lease.fencing) for r in self._jobs.values() if not r.lost]


def default_runtime_factory(
    config: AgentConfig,
    identity: StoredIdentity,
    on_started: Callable[[str, int, "str | None"], None],
    on_exited: Callable[[str, int, "str | None"], None],
) -> RuntimeLike:
    from edge_agent.runtime import Runtime, RuntimeSettings

    settings = RuntimeSettings(
        python=config.runtime_python,
        airflow_home=config.runtime_airflow_home,
        dags_folder=config.dags_folder,
        log_folder=config.log_folder,
        executor=identity.executor,
    )
    # Stopping the runtime may have to wait out a cancel: give it the cancel grace and a margin.
    return Runtime(settings, on_started=on_started, on_exited=on_exited, stop_timeout=config.cancel_grace + 15.0)


def default_forwarder_factory(socket_path: Path, send: SendFn, after_reply: AfterReplyFn) -> ForwarderLike:
    from edge_agent.forwarder import Forwarder

    return Forwarder(socket_path, send, after_reply=after_reply)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        identity: StoredIdentity,
        api_factory: Callable[[], Any],
        *,
        runtime_factory: Callable[..., RuntimeLike] = default_runtime_factory,
        forwarder_factory: Callable[[Path, SendFn, AfterReplyFn], ForwarderLike] = default_forwarder_factory,
        policy: Policy | None = None,
        keystore: Keystore | None = None,
        client_factory: Callable[[StoredIdentity], Any] | None = None,
        observe: tuple[str, int] | None = None,
    ) -> None:
        self.config = config
        #: (host, port) of the /healthz, /readyz, /metrics endpoint (``--metrics-port``); None = off.
        self._observe = observe
        self._observer: Any = None
        #: Replaced (under ``cond``) when the certificate rotates.
        self.identity = identity
        self.policy = policy or Policy()
        #: With both, the rotation loop runs: it stores the new pair and builds the new HTTP client.
        self.keystore = keystore
        self.client_factory = client_factory
        self.audit: AuditLog | None = None
        self._api_factory = api_factory
        self._runtime_factory = runtime_factory
        self._forwarder_factory = forwarder_factory
        self.spool = Spool(config.state_dir)

        self.cond = threading.Condition(threading.RLock())
        self.jobs = JobTable(self.cond, config.concurrency)
        self.status = StatusBoard(config.status_file)
        self.metrics = Metrics(self._gauges)
        self.status.on_gateway_error = lambda: self.metrics.inc("edge_agent_gateway_errors_total")
        self.phase = Phase.RUNNING
        self.stop_reason: str | None = None
        self.fatal: EdgeAgentError | None = None
        #: An error that stops the agent after a drain (running jobs finish), raised by run() at the end.
        self.fatal_after_drain: EdgeAgentError | None = None
        self._abort = False
        #: Set at teardown: log shipper and heartbeat leave their loops.
        self.loops_stopping = False
        #: The gateway asked for maintenance drain (heartbeat reply): no leasing while it says so.
        self.server_drain = False
        self._deadline: float | None = None
        self._cancelled = False
        #: What cancelled jobs are told (and reported FAILED with).
        self._cancel_reason = "agent stopping now (second stop request)"
        #: The log shipper's last pass failed on the gateway: reports wait in the spool.
        self.reports_blocked = False
        #: Spooled jobs were loaded and the log shipper has not tried them yet: no leasing before.
        self.replay_pending = False
        #: Another loop reached the gateway again: the log shipper cuts its backoff short.
        self.retry_reports_now = False
        #: False until the runtime is ready and the loops run (status shows "starting").
        self._serving = False

        self.api: Any = None
        self.runtime: RuntimeLike | None = None
        self.socket_path: Path | None = None
        #: systemd notifications (READY, WATCHDOG, STOPPING); a no-op outside a Type=notify service.
        self._notifier = Notifier.from_env()

    # -- stop requests: only touch the RLock'd condition (safe from a signal handler) ----------

    def stop_gracefully(self, reason: str = "stop requested") -> None:
        with self.cond:
            if self.phase is Phase.RUNNING:
                self.phase = Phase.DRAINING
                self.stop_reason = reason
            self.cond.notify_all()

    def stop_now(self, reason: str = "stop requested twice") -> None:
        with self.cond:
            if self.phase in (Phase.RUNNING, Phase.DRAINING):
                self.phase = Phase.CANCELLING
                self.stop_reason = reason
            self.cond.notify_all()

    def abort(self, reason: str = "stop requested three times") -> None:
        with self.cond:
            self._abort = True
            self.stop_reason = reason
            self.cond.notify_all()

    def fail(self, exc: EdgeAgentError) -> None:
        """A loop met an error the agent cannot continue with (identity rejected, cert expired)."""
        with self.cond:
            if self.fatal is None:
                self.fatal = exc
                self.phase = Phase.FAILED
                self.stop_reason = str(exc)
            self.cond.notify_all()

    def drain_and_fail(self, exc: EdgeAgentError) -> None:
        """Stop taking work because of ``exc``, let running jobs finish, then exit with ``exc``."""
        with self.cond:
            if self.fatal_after_drain is None:
                self.fatal_after_drain = exc
        self.stop_gracefully(str(exc))

    @property
    def leasing(self) -> bool:
        with self.cond:
            return self.phase is Phase.RUNNING and not self._abort

    # -- job events (runtime reader thread, heartbeat, log shipper) -------------------------------

    def _on_started(self, job_id: str, pid: int, log_file: str | None) -> None:
        with self.cond:
            rec = self.jobs.get(job_id)
            if rec is None or rec.replayed:
                return
            rec.pid = pid
            rec.started_at = _utcnow()
            if log_file:
                path = Path(log_file)
                rec.log_file = path if path.is_absolute() else self.config.log_folder / path
            self.jobs.dirty = True
            self.cond.notify_all()
        log.info("job %s started (pid %s)", job_id, pid, extra=job_fields(rec.lease))
        self.metrics.inc("edge_agent_jobs_started_total")
        self.spool_save(rec)  # RUNNING is now owed to the gateway
        try:
            self._audit("start", rec.lease, pid=pid)
        except AuditError as exc:
            log.error("job %s started but its start could not be recorded: %s", job_id, exc, extra=job_fields(rec.lease))
        self.publish()

    def _after_relay(self, method: str, path: str, status: int) -> None:
        """After the forwarder sent a task its reply: an accepted ``/run`` goes to the audit log."""
        if method == "PATCH" and 200 <= status < 300:
            match = RUN_PATH.fullmatch(path)
            if match is not None:
                self._on_run(match.group(1))

    def _on_run(self, ti_id: str) -> None:
        """Airflow moved the try to running for this agent: from here on the task code runs.

        ``start`` says a supervisor was forked; a try whose job was requeued meanwhile (this agent
        was cut off) never gets past Airflow's ``/run``, so ``run`` is what says the task ran here.
        """
        with self.cond:
            rec = next((r for r in self.jobs.records() if r.lease.ti_id == ti_id.lower()), None)
        if rec is None:
            log.warning("Airflow accepted /run of task instance %s, which no job of this agent runs", ti_id)
            return
        try:
            self._audit("run", rec.lease)
        except AuditError as exc:
            log.error("job %s: its run could not be recorded: %s", rec.job_id, exc, extra=job_fields(rec.lease))

    def _on_exited(self, job_id: str, exit_code: int, reason: str | None) -> None:
        with self.cond:
            rec = self.jobs.get(job_id)
            if rec is None or rec.replayed:
                return
            rec.exited = True
            rec.exit_code = exit_code
            rec.reason = reason
            rec.spooled = False  # in the same step: a drain must not see "exited" before the exit is on disk
            lost = rec.lost
            self.jobs.dirty = True
            self.cond.notify_all()
        log.info("job %s exited with %s%s", job_id, exit_code, f" ({reason})" if reason else "",
                 extra=job_fields(rec.lease))
        self.metrics.inc("edge_agent_jobs_finished_total", state="success" if exit_code == 0 else "failed")
        # Spooled before anything else: from here on the final state survives a crash or an outage.
        self.spool_save(rec)
        try:
            self._audit("finish", rec.lease, exit_code=exit_code, reason=reason, lost=lost or None)
        except AuditError as exc:
            log.error("job %s finished but its end could not be recorded: %s", job_id, exc,
                      extra=job_fields(rec.lease))
        self.publish()

    # -- the spool ---------------------------------------------------------------------------------

    def spool_save(self, rec: JobRecord, *, progress: bool = False) -> None:
        """Write the record's current state to the spool (never call with the condition held).

        ``progress``: only an acknowledgement moved (RUNNING delivered, the log cursor) while the
        task runs; written without fsync (``spool.py``). Once the task ended every write is durable.
        """
        with self.cond:
            if rec.lost:
                return  # not ours any more: nothing will be delivered
            durable = not progress or rec.exited
            rec.spool_seq += 1
            rec.spooled = False  # until this version is on disk (a drain must not exit before)
            if rec.spooled_at is None:
                rec.spooled_at = _utcnow()
            seq, entry = rec.spool_seq, rec.to_spool(self.identity.agent_id)
        ok = self.spool.save(entry, seq, durable=durable)
        with self.cond:
            if rec.spool_seq == seq:
                rec.spooled = ok
            self.cond.notify_all()
        self.status.set(spool=self.spool.usage().as_dict())

    def _load_spool(self) -> None:
        """Take over what an earlier agent process could not deliver; it is replayed before leasing."""
        try:
            loaded = self.spool.open()
        except OSError as exc:
            raise ConfigError(f"cannot use the spool directory {self.spool.dir}: {exc}") from None
        for entry, seq in loaded:
            rec = JobRecord.from_spool(entry, seq)
            if not rec.exited and rec.refused is None:
                # The earlier agent process stopped (crash, kill, power loss) before it saw the task
                # end; its runtime stopped the task with it. Without this report the task instance
                # would wait for Airflow's heartbeat timeout.
                rec.exited, rec.exit_code = True, EXIT_RUNTIME_LOST
                rec.reason = (f"the edge-agent process running this job stopped before the job ended "
                              f"(supervisor pid {rec.pid}); the task was stopped with it")
                try:
                    self._audit("finish", rec.lease, exit_code=rec.exit_code, reason=rec.reason, replayed=True)
                except AuditError as exc:
                    log.error("job %s: its end could not be recorded: %s", rec.job_id, exc,
                              extra=job_fields(rec.lease))
                self.jobs.add_replayed(rec)
                self.spool_save(rec)
            else:
                self.jobs.add_replayed(rec)
            log.info("job %s (%s.%s run %s try %d) from the spool: to deliver: %s", rec.job_id, entry.dag_id,
                     entry.task_id, entry.run_id, entry.try_number, ", ".join(entry.pending()) or "nothing",
                     extra=job_fields(rec.lease))
        if loaded:
            with self.cond:
                self.replay_pending = True
            usage = self.spool.usage()
            log.info("replaying %d spooled job(s) (%d bytes) before leasing", usage.jobs, usage.bytes)
        self.publish()

    def reports_done(self, ok: bool) -> None:
        """The log shipper finished a pass: ``ok`` False = the gateway failed, reports wait in the spool."""
        with self.cond:
            self.replay_pending = False
            self.reports_blocked = not ok
            self.cond.notify_all()

    def gateway_ok(self) -> None:
        """A loop reached the gateway after failures: reports waiting in the spool go now, not after a backoff."""
        with self.cond:
            if self.reports_blocked:
                self.retry_reports_now = True
                self.cond.notify_all()

    # -- the local policy and the audit log -----------------------------------------------------------

    def admit(self, lease: Lease, decision: Decision) -> bool:
        """Hold a lease as the policy decided, and record the decision; True = hand it to the runtime.

        A decision that cannot be recorded is not acted on: the job is refused instead, and the agent
        drains and stops (it must not run jobs it cannot account for).
        """
        refused = None if decision.accepted else decision.reason
        if not self.jobs.add(lease, refused=refused):
            log.warning("lease of job %s arrived while stopping; the gateway will requeue it", lease.job_id,
                        extra=job_fields(lease))
            return False
        try:
            self._audit("decision", lease, decision="accepted" if decision.accepted else "refused",
                        reason=decision.reason)
        except AuditError as exc:
            with self.cond:
                rec = self.jobs.get(lease.job_id)
                if rec is not None:
                    rec.refused, rec.exited = f"not run: {exc}", True
                    self.jobs.dirty = True
                    self.cond.notify_all()
            if rec is not None:
                self.spool_save(rec)
            log.error("job %s refused: %s", lease.job_id, exc, extra=job_fields(lease))
            self.drain_and_fail(exc)
            return False
        if refused is not None:
            log.warning("job %s refused by the local policy: %s", lease.job_id, refused, extra=job_fields(lease))
            self.metrics.inc("edge_agent_jobs_refused_total")
            rec = self.jobs.get(lease.job_id)
            if rec is not None:
                self.spool_save(rec)  # the REFUSED report is owed
        self.publish()
        return refused is None

    def _audit(self, event: str, lease: Lease, **fields: Any) -> None:
        if self.audit is None:
            raise AuditError("the audit log is not open")
        job, _ = facts(lease)
        self.audit.append(
            event, job_id=lease.job_id, fencing=lease.fencing, queue=job.queue, bundle=job.bundle,
            ti={"dag_id": job.dag_id, "task_id": job.task_id, "run_id": job.run_id, "map_index": job.map_index,
                "try_number": job.try_number},
            logs=lease.log_policy.value, **fields,
        )

    def jobs_lost(self, jobs: "list[str | JobRecord]", why: str) -> None:
        """The gateway no longer holds these jobs (ids of live jobs, or records) for us: stop them, report nothing more."""
        to_cancel, forget = [], []
        with self.cond:
            for item in jobs:
                rec = self.jobs.get(item) if isinstance(item, str) else item
                if rec is None or rec.lost:
                    continue
                job_id = rec.job_id
                rec.lost = True
                forget.append((job_id, rec.lease.fencing))
                self.jobs.dirty = True
                if not rec.exited:
                    to_cancel.append(rec)
            self.cond.notify_all()
        for job_id, fencing in forget:
            self.spool.delete(job_id, fencing)  # nothing about it will be delivered
        for rec in to_cancel:
            log.warning("job %s lost (%s): cancelling it", rec.job_id, why, extra=job_fields(rec.lease))
            self._cancel(rec.job_id, f"lease lost: {why}")
        self.publish()

    def job_done(self, rec: JobRecord) -> None:
        """The job's final state was delivered (or it was lost): free its slot and its spool record."""
        # Spool first: whoever sees the slot free must not find the delivered record still on disk.
        self.spool.delete(rec.job_id, rec.lease.fencing)
        self.jobs.remove(rec)
        self.publish()

    def _cancel(self, job_id: str, reason: str) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        try:
            runtime.cancel(job_id, reason, grace=self.config.cancel_grace)
        except Exception as exc:  # the runtime may already be gone; the job then exits on its own
            rec = self.jobs.get(job_id)
            log.warning("could not cancel job %s: %s", job_id, exc,
                        extra=job_fields(rec.lease) if rec is not None else {"job_id": job_id})

    def publish(self) -> None:
        """Push the current jobs/slots/phase to the status board (never call with the condition held)."""
        with self.cond:
            jobs = [r.summary() for r in self.jobs.records()]
            free = self.jobs.free_slots()
            phase = self.phase.value if self._serving or self.phase is not Phase.RUNNING else "starting"
        self.status.set(state=phase, jobs=jobs, free_slots=free, total_slots=self.config.concurrency,
                        spool=self.spool.usage().as_dict())

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped. Returns the exit code; raises the fatal error if one stopped the agent."""
        if self.identity.expired():
            raise CertificateExpired(self.identity.cert_not_after)
        # Two 'run's with one identity would lease with the same certificate and fight over slots.
        lock_fd = statelock.acquire(self.config.state_dir)
        tmp_dir: str | None = None
        forwarder: ForwarderLike | None = None
        threads: dict[str, threading.Thread] = {}
        watchdog: Watchdog | None = None
        try:
            self.status.set(agent_id=self.identity.agent_id, name=self.identity.name, url=self.identity.url,
                            state="starting", policy=self.policy.describe())
            self.publish()
            # Under the state-dir lock: one writer chains onto the log's last line.
            self.audit = AuditLog.open(self.config.state_dir, self.identity.agent_id)
            self._start_observer()
            # Under the lock too: one process owns the spool. Loaded before any loop runs, so the
            # lease loop sees that replays come first.
            self._load_spool()
            log.info("local policy: %s", self.policy.describe())
            for d in (self.config.log_folder, self.config.runtime_airflow_home):
                d.mkdir(parents=True, exist_ok=True)
            self.api = self._api_factory()
            self._check_identity()

            if self.config.runtime_dir is not None:
                sock_dir = self.config.runtime_dir
            else:
                tmp_dir = tempfile.mkdtemp(prefix="edge-agent-")  # 0700
                sock_dir = Path(tmp_dir)
            self.socket_path = sock_dir / "forwarder.sock"
            forwarder = self._forwarder_factory(self.socket_path, self.api.execution_request, self._after_relay)
            self._start_forwarder(forwarder)

            self.status.activity("agent", "starting the task runtime")
            self.runtime = self._runtime_factory(self.config, self.identity, self._on_started, self._on_exited)
            self.runtime.start()  # RuntimeStartError is a RuntimeUnavailable: reported as one line

            from edge_agent.heartbeat import HeartbeatLoop
            from edge_agent.lease_loop import LeaseLoop
            from edge_agent.logship import LogShipper

            loops: list[tuple[str, Any]] = [("heartbeat", HeartbeatLoop(self)), ("logship", LogShipper(self)),
                                            ("lease", LeaseLoop(self))]
            if self.keystore is not None and self.client_factory is not None:
                from edge_agent.rotation import RotationLoop

                loops.append(("rotation", RotationLoop(self, self.keystore, self.client_factory)))
            for name, loop in loops:
                # The lease thread is a daemon: it may sit in a long-poll when we leave; a lease that
                # arrives after that lapses on the server and goes back to the queue.
                t = threading.Thread(target=loop.run, name=f"edge-agent-{name}", daemon=True)
                t.start()
                threads[name] = t
            self._serving = True
            log.info("agent %s running with %d slots (drain grace %g s, cancel grace %g s)",
                     self.identity.agent_id, self.config.concurrency, self.config.drain_grace,
                     self.config.cancel_grace)
            # systemd (Type=notify): ready only once the runtime and the loops run; the watchdog is
            # fed only while every loop thread lives, so a wedged agent is restarted.
            self._notifier.ready(f"serving {self.config.concurrency} slots as {self.identity.agent_id}")
            watchdog = Watchdog(self._notifier, lambda: all(t.is_alive() for t in threads.values())).start()
            self._supervise()
        finally:
            if watchdog is not None:
                watchdog.stop()
            self._teardown(threads, forwarder)
            if self._observer is not None:
                self._observer.stop()
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            if self.audit is not None:
                self.audit.close()
            os.close(lock_fd)
        fatal = self.fatal or self.fatal_after_drain
        if fatal is not None:
            log.error("agent stopped: %s", fatal)
            raise fatal
        log.info("agent stopped")
        return 0

    # -- health and metrics (``observability/endpoint.py``) -----------------------------------------

    def _start_observer(self) -> None:
        if self._observe is None:
            return
        from edge_agent.observability.endpoint import ObservabilityServer

        host, port = self._observe
        self._observer = ObservabilityServer(port, host=host, health=self._health, ready=self._ready,
                                             metrics=self.metrics.render).start()

    def _health(self) -> Check:
        """The same verdict as 'edge-agent health', from memory instead of the status file."""
        from edge_agent.service import health

        verdict = health({**self.status.snapshot(), "alive": True})
        return Check(verdict.ok, verdict.reason)

    def _ready(self) -> Check:
        """Would this agent take work now?"""
        with self.cond:
            serving, phase, server_drain = self._serving, self.phase, self.server_drain
        reachable = self.status.reachable()
        if not serving:
            return Check(False, "starting")
        if phase is not Phase.RUNNING:
            return Check(False, f"{phase.value}: {self.stop_reason}")
        if server_drain:
            return Check(False, "drained by the server ('airflow edge-agents resume' lifts it)")
        if reachable is False:
            return Check(False, "gateway unreachable")
        return Check(True, f"serving; {self.jobs.free_slots()} of {self.config.concurrency} slots free")

    def _gauges(self) -> dict[str, float | None]:
        spool = self.spool.usage()
        reachable = self.status.reachable()
        with self.cond:
            running = sum(1 for r in self.jobs.records() if r.started and not r.exited)
            draining = self.phase is not Phase.RUNNING or self.server_drain
        expires = self.identity.cert_not_after
        return {
            "edge_agent_jobs_running": running,
            "edge_agent_slots_free": self.jobs.free_slots(),
            "edge_agent_slots_total": self.config.concurrency,
            "edge_agent_spool_jobs": spool.jobs,
            "edge_agent_spool_bytes": spool.bytes,
            "edge_agent_cert_expiry_seconds": (expires - datetime.now(timezone.utc)).total_seconds() if expires else None,
            "edge_agent_gateway_up": None if reachable is None else float(bool(reachable)),
            "edge_agent_draining": float(draining),
        }

    def _check_identity(self) -> None:
        """Fail fast on a revoked identity; an unreachable gateway is not fatal (the loops retry)."""
        self.status.activity("agent", "checking identity with the gateway")
        try:
            who = self.api.whoami()
        except IdentityRejected:
            raise
        except EdgeAgentError as exc:
            log.warning("gateway not reachable yet (%s); will keep trying", exc)
            self.status.gateway(False, str(exc))
            return
        self.status.gateway(True)
        log.info("gateway knows this agent as %s (%s), queues %s, region %s",
                 who.agent_id, who.name, ",".join(who.queues), who.region)

    @staticmethod
    def _start_forwarder(forwarder: ForwarderLike) -> None:
        from edge_agent.forwarder import ForwarderError

        try:
            forwarder.start()
        except ForwarderError as exc:
            raise ConfigError(f"cannot start the task forwarder: {exc}") from None

    def _supervise(self) -> None:
        """Main thread: wait for a stop request, then drain or cancel until the jobs are gone."""
        acted: Phase | None = None
        while True:
            with self.cond:
                while not self._abort:
                    phase = self.phase
                    if phase is not acted:
                        break
                    if self._finished(phase):
                        return
                    if phase is Phase.DRAINING and _past(self._deadline):
                        # Past the drain grace: a service manager would soon kill everything
                        # without a report; cancelling now reports the tasks as failed instead.
                        why = f"drain grace of {self.config.drain_grace:g} s expired"
                        self.phase, self.stop_reason, self._cancel_reason = Phase.CANCELLING, why, why
                        continue
                    deadline = self._deadline
                    self.cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                else:
                    phase = None  # aborted
            if phase is None:
                log.warning("leaving without waiting for jobs: %s", self.stop_reason)
                return
            acted = phase
            self._enter(phase)

    def _finished(self, phase: Phase) -> bool:
        # Called with the condition held.
        if phase is Phase.DRAINING:
            return self.jobs.close_if_settled(self.reports_blocked)
        if phase is Phase.CANCELLING:
            return self.jobs.close_if_settled(self.reports_blocked) or _past(self._deadline)
        if phase is Phase.FAILED:
            # Reports cannot succeed with a rejected identity: wait for the processes, not the reports.
            if self.jobs.all_exited() or _past(self._deadline):
                self.jobs.close()
                return True
        return False

    def _enter(self, phase: Phase) -> None:
        """Act on a phase change; runs on the main thread without the condition held."""
        self.publish()
        if phase is Phase.RUNNING:
            self.status.activity("agent", "running")
            return
        log.info("%s: %s", phase.value, self.stop_reason)
        self._notifier.stopping(f"{phase.value}: {self.stop_reason}")
        if phase is Phase.DRAINING:
            with self.cond:
                self._deadline = time.monotonic() + self.config.drain_grace
            self.status.activity("agent", f"draining ({self.stop_reason}): no new work, waiting up to "
                                          f"{self.config.drain_grace:g} s for running jobs, then cancelling them")
            return
        if self._cancelled:
            return
        self._cancelled = True
        with self.cond:
            self._deadline = time.monotonic() + self.config.cancel_grace + CANCEL_REPORT_MARGIN
            reason = self._cancel_reason if phase is Phase.CANCELLING else f"agent failed: {self.fatal}"
        self.status.activity("agent", f"{phase.value}: cancelling running jobs ({reason})")
        for rec in self.jobs.records():
            if not rec.exited:
                self._cancel(rec.job_id, reason)

    def _teardown(self, threads: dict[str, threading.Thread], forwarder: ForwarderLike | None) -> None:
        self.jobs.close()
        with self.cond:
            if self.phase is Phase.RUNNING:
                self.phase = Phase.DRAINING  # lease loop: stop asking
            self.loops_stopping = True
            self.cond.notify_all()
        self.status.activity("agent", "stopping")
        # After an abort nobody waits for a loop stuck in a request; otherwise a short while (what it
        # was sending is in the spool).
        join_timeout = 0.0 if self._abort else min(TEARDOWN_JOIN_SECONDS, self.config.request_timeout)
        if "logship" in threads:
            threads["logship"].join(join_timeout)
        if self.runtime is not None:
            try:
                self.runtime.stop()
            except Exception as exc:
                log.warning("runtime did not stop cleanly: %s", exc)
        if forwarder is not None:
            try:
                forwarder.stop()
            except Exception as exc:
                log.warning("forwarder did not stop cleanly: %s", exc)
        for name in ("heartbeat", "rotation"):
            if name in threads:
                threads[name].join(join_timeout)
        if self.api is not None:
            self.api.close()
        with self.cond:
            if self.fatal is None:
                self.phase = Phase.STOPPED
        self.publish()
        left = self.spool.usage()
        if left.jobs:
            log.warning("%d job(s) with undelivered reports stay in the spool (%s); the next 'edge-agent run' "
                        "delivers them", left.jobs, self.spool.dir)
        self.status.activity("agent", "stopped" if self.fatal is None else f"stopped: {self.fatal}")


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


__all__ = ["Agent", "JobRecord", "JobTable", "Phase"]
