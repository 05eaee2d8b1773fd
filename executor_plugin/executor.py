"""``EdgeAgentExecutor``: the scheduler's side of edge-agent; jobs live in our tables, agents lease them.

* ``queue_workload`` writes one job row per ``ExecuteTask`` in the scheduler's own session, so the
  job commits atomically with the task instance's QUEUED state; nothing is held in memory.
* ``sync`` (every scheduler heartbeat) requeues the leased jobs of agents that stopped
  heartbeating (``[edge_agent] agent_dead_after_seconds``) and lapsed leases, turns job state
  changes into scheduler events (running / success / fail), and purges old reported jobs and
  refusals. A job an agent refused and that went back to the queue is no event: the try simply
  waits for another agent (a refusal nobody else can take fails the job, and that failure is an
  event). Every few seconds it also closes the running jobs of offline agents whose task instance
  Airflow has settled (no event: Airflow is done with the try).
* **Events go to the scheduler that holds the try.** With several schedulers on one database,
  each executor emits only the events of keys in its own ``running``/``queued_tasks`` (queued by
  it, or adopted through ``try_adopt_task_instances``): Airflow ignores an event for a task
  instance another scheduler queued (``queued_by_job_id``), so consuming it would lose it. An
  event no executor claims for :data:`UNCLAIMED_EVENT_TTL` (longer if Airflow's adoption of a
  dead scheduler's tasks can take longer) is dropped.
* ``revoke_task`` cancels a job; ``try_adopt_task_instances`` re-adopts jobs after a restart.

Agents and the gateway keep working while the scheduler is down: ``end``/``terminate`` stop
nothing. This module makes no HTTP calls and holds no SQL: every query is in
:mod:`executor_plugin.store`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session

from executor_plugin import store
from executor_plugin.models import JobStatus
from executor_plugin.queue_metrics import QueueMetrics
from executor_plugin.settings import agent_dead_after_from_conf

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory

#: How often queued jobs are checked against their task instances (one indexed query each time),
#: and running keys against open jobs.
RECONCILE_EVERY_SECONDS = 10.0
#: How often lapsed leases and the leases of offline agents are looked for. Each look is an UPDATE
#: that mostly matches nothing (on SQLite it takes the write lock); a busy scheduler syncs many
#: times a second, and a second is nothing next to a lease TTL or the dead-agent window.
LIVENESS_EVERY_SECONDS = 1.0
#: Reported terminal jobs stay this long (for ``airflow edge-agents list`` and debugging) before purge.
PURGE_AFTER = timedelta(hours=1)
#: Refusals by agents keep a task instance (and its retries) away from the refusing agent this long.
REFUSAL_RETENTION = timedelta(days=7)
#: Purging is a DELETE that mostly matches nothing; on SQLite every write statement takes the
#: database write lock, so it runs once a minute rather than on every heartbeat.
PURGE_EVERY_SECONDS = 60.0
#: An event no executor holds the key of is dropped once this old (see :func:`unclaimed_event_ttl`).
#: Until then it waits for the scheduler that queued the try, or for the one that adopts its tasks.
UNCLAIMED_EVENT_TTL = timedelta(minutes=10)

KeyTuple = tuple[str, str, str, int, int]


def job_key(job: store.Job) -> TaskInstanceKey:
    """The scheduler's key of a job (``TaskInstanceKey`` orders try_number before map_index)."""
    return TaskInstanceKey(
        dag_id=job.dag_id,
        task_id=job.task_id,
        run_id=job.run_id,
        try_number=job.try_number,
        map_index=job.map_index,
    )


def key_tuple(key: TaskInstanceKey) -> KeyTuple:
    """The store's key of a try: (dag_id, task_id, run_id, map_index, try_number)."""
    return (key.dag_id, key.task_id, key.run_id, key.map_index, key.try_number)


def unclaimed_event_ttl() -> timedelta:
    """How long an event waits for an executor to claim it: :data:`UNCLAIMED_EVENT_TTL`, or longer.

    A scheduler that dies leaves its tries to another one, which adopts them at its next orphan
    check once the dead one is ``scheduler_health_check_threshold`` stale; dropping the event
    before that would lose it (e.g. a "failed before start" for a TI still QUEUED).
    """
    from airflow.configuration import conf

    adoption = conf.getfloat("scheduler", "orphaned_tasks_check_interval", fallback=300.0) + conf.getfloat(
        "scheduler", "scheduler_health_check_threshold", fallback=30.0
    )
    return max(UNCLAIMED_EVENT_TTL, timedelta(seconds=adoption + 60))


class EdgeAgentExecutor(BaseExecutor):
    """Runs tasks on edge agents: select it per task with ``executor="EdgeAgentExecutor"``."""

    supports_callbacks = False
    supports_connection_test = False
    # Tasks run on remote agents, never on this host, and agents ship their logs to the hosted side:
    # there is no local log server to start.
    is_local = False
    serve_logs = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next_purge = 0.0  # monotonic time of the next purge; 0 = at the first sync
        self._next_reconcile = 0.0  # same, for cancelling jobs of TIs settled by hand
        self._next_liveness = 0.0  # same, for requeueing lapsed leases and those of offline agents
        self._failed_syncs = 0  # consecutive; the traceback is logged once per outage, not per heartbeat
        self._queue_metrics: QueueMetrics | None = None
        self._agent_dead_after: timedelta | None = None  # [edge_agent] agent_dead_after_seconds, read once
        self._unclaimed_ttl: timedelta | None = None

    @property
    def agent_dead_after(self) -> timedelta:
        """An agent whose last heartbeat is older than this is offline (raises ``SettingsError``)."""
        if self._agent_dead_after is None:
            self._agent_dead_after = agent_dead_after_from_conf()
        return self._agent_dead_after

    @property
    def unclaimed_ttl(self) -> timedelta:
        if self._unclaimed_ttl is None:
            self._unclaimed_ttl = unclaimed_event_ttl()
        return self._unclaimed_ttl

    # ----------------------------------------------------------------------------------------------
    # Life cycle
    # ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Make sure our tables exist at head before the scheduler queues anything to us."""
        from airflow.utils.db import DBLocks, create_global_lock

        from executor_plugin.db_manager import EdgeAgentDBManager

        _warn_if_db_manager_unregistered()
        # A bad [edge_agent] agent_dead_after_seconds stops the scheduler here, with the option's name,
        # not at its first sync.
        self.log.info("EdgeAgentExecutor: agents are offline after %.0f s without a heartbeat",
                      self.agent_dead_after.total_seconds())
        with create_session(scoped=False) as session:
            manager = EdgeAgentDBManager(session)
            if manager.check_migration():
                return
            # Without the tables, queue_workload would fail inside the scheduler's critical section
            # on every loop. `airflow db migrate` should have created them; do it now, under the
            # same lock `airflow db migrate` takes, so two schedulers cannot race on the DDL.
            self.log.warning(
                "edge-agent tables are missing or not at the latest revision; migrating them now "
                "(run 'airflow db migrate' after installing or upgrading edge-agent)"
            )
            with create_global_lock(session=session, lock=DBLocks.MIGRATIONS):
                manager.initdb()

    def end(self) -> None:
        """Nothing to stop: jobs live in the database and agents keep running them."""
        self.log.info("EdgeAgentExecutor stopping; queued and running jobs stay with the agents")

    def terminate(self) -> None:
        """Nothing to stop: jobs live in the database and agents keep running them."""

    # ----------------------------------------------------------------------------------------------
    # Queueing
    # ----------------------------------------------------------------------------------------------

    def queue_workload(self, workload: workloads.ExecutorWorkload, session: Session) -> None:
        """Write a QUEUED job in the scheduler's transaction; the scheduler commits it with the TI."""
        if not isinstance(workload, workloads.ExecuteTask):
            raise NotImplementedError(
                f"{type(self).__name__} runs tasks only; it cannot run {type(workload).__name__} "
                "workloads (route callbacks and connection tests to another executor)"
            )
        ti = workload.ti
        store.enqueue_job(
            session,
            # No usable credential at rest: the gateway mints a fresh task token at lease time,
            # so a copy of the job table (backup, replica, support dump) holds no live tokens.
            workload_json=workload.model_copy(update={"token": ""}).model_dump_json(),
            ti_id=str(ti.id),
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
            try_number=ti.try_number,
            queue=ti.queue,
            priority_weight=ti.priority_weight,
        )
        # Counted before the caller commits so [core] parallelism holds; if the scheduler's
        # transaction rolls back, sync() drops the key again (no job row backs it).
        self.running.add(ti.key)

    def _process_workloads(self, workload_items: Sequence[workloads.ExecutorWorkload]) -> None:
        """Nothing to do: ``queue_workload`` already stored every workload as a job."""

    # ----------------------------------------------------------------------------------------------
    # Sync
    # ----------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Turn job state changes into scheduler events. A database error waits for the next heartbeat."""
        try:
            with create_session(scoped=False) as session:
                self._sync(session)
        except SQLAlchemyError as exc:
            # The scheduler must survive a locked or briefly unreachable database; the unreported
            # states are still unreported and are picked up on the next heartbeat.
            self._failed_syncs += 1
            if self._failed_syncs == 1:
                self.log.exception("EdgeAgentExecutor sync failed; retrying on every heartbeat")
            else:
                reason = str(getattr(exc, "orig", None) or type(exc).__name__).splitlines()[0]
                self.log.warning("EdgeAgentExecutor sync failed %d times in a row: %s", self._failed_syncs, reason)
            return
        if self._failed_syncs:
            self.log.info("EdgeAgentExecutor sync works again after %d failure(s)", self._failed_syncs)
            self._failed_syncs = 0

    def _sync(self, session: Session) -> None:
        now = time.monotonic()
        if now >= self._next_liveness:
            self._next_liveness = now + LIVENESS_EVERY_SECONDS
            self._requeue_jobs_of_offline_agents(session)
            requeued = store.requeue_expired_leases(session)
            if requeued:
                self.log.warning("Requeued %d job(s) whose agent did not start them before the lease lapsed", requeued)
        mine, unclaimed = [], []
        for job in store.pending_events(session):
            (mine if self._holds(job_key(job)) else unclaimed).append(job)
        finished = {job_key(job) for job in mine}
        for job in mine:
            self._emit(job)
            store.mark_reported(session, job.id, job.state)
        self._drop_old_unclaimed(session, unclaimed)
        if now >= self._next_reconcile:
            self._next_reconcile = now + RECONCILE_EVERY_SECONDS
            cancelled = store.cancel_queued_jobs_of_settled_tis(session)
            if cancelled:
                self.log.info("Cancelled %d queued job(s) whose task instance was settled elsewhere", cancelled)
            for closed in store.close_running_jobs_of_offline_agents(session, dead_after=self.agent_dead_after):
                self.log.info("Closed running job %s of %s: %s", closed.job.id, job_key(closed.job), closed.job.reason)
            # After the closes above, so a closed job's slot is free in this same sync.
            self._forget_keys_without_jobs(session, finished=finished)
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_SECONDS
            purged = store.purge_reported(session, older_than=store.utcnow() - PURGE_AFTER)
            purged_refusals = store.purge_refusals(session, older_than=store.utcnow() - REFUSAL_RETENTION)
            if purged or purged_refusals:
                self.log.debug("Purged %d finished job(s) and %d old refusal(s)", purged, purged_refusals)
        self._emit_queue_metrics(session)

    def _emit_queue_metrics(self, session: Session) -> None:
        """Per-queue gauges and lease latency through Airflow's metrics, every EMIT_EVERY seconds."""
        if self._queue_metrics is None:
            self._queue_metrics = QueueMetrics(self.agent_dead_after)
        try:
            self._queue_metrics.maybe_emit(session, store.utcnow())
        except SQLAlchemyError:
            raise  # the sync's own handling: retried on the next heartbeat
        except Exception:
            # A broken metrics backend must never stop jobs from being reported.
            self.log.exception("Emitting edge-agent queue metrics failed")

    def _requeue_jobs_of_offline_agents(self, session: Session) -> None:
        """Requeue at once what agents that stopped heartbeating had leased but not started."""
        for requeue in store.requeue_leased_of_offline_agents(session, dead_after=self.agent_dead_after):
            self.log.warning(
                "Agent %s (%s) missed heartbeats for %.0f s: requeued %d job(s) it had not started",
                requeue.agent_name,
                requeue.agent_id,
                requeue.silent_for,
                requeue.requeued,
            )

    def _holds(self, key: TaskInstanceKey) -> bool:
        """Is the try ours to report: queued by this scheduler, or adopted by it?"""
        return key in self.running or key in self.queued_tasks

    def _drop_old_unclaimed(self, session: Session, unclaimed: Sequence[store.Job]) -> None:
        """Mark reported the events no executor claimed in time (their scheduler and its adopter are gone).

        Younger ones stay: another scheduler holds the key, or will once it adopts a dead one's tasks.
        """
        cutoff = store.utcnow() - self.unclaimed_ttl
        for job in unclaimed:
            if job.changed_at < cutoff:
                self.log.debug(
                    "Dropping the %s event of %s (job %s): no scheduler claimed it since %s",
                    job.state, job_key(job), job.id, job.changed_at.isoformat(),
                )
                store.mark_reported(session, job.id, job.state)

    def _emit(self, job: store.Job) -> None:
        # Events are emitted before mark_reported commits: if the commit fails, the next sync emits
        # them again, and the scheduler ignores a repeated event for a TI it has already moved on.
        key = job_key(job)
        if job.state == JobStatus.RUNNING:
            self.running_state(key, info=job.agent_id)
        elif job.state == JobStatus.SUCCESS:
            self.success(key)
        elif job.state == JobStatus.FAILED:
            self.fail(key, info=job.reason)

    def _forget_keys_without_jobs(self, session: Session, *, finished: set[TaskInstanceKey]) -> None:
        """Drop running keys with no open job (scheduler rollback, cancelled or purged elsewhere).

        Otherwise such a key would hold a parallelism slot until the scheduler restarts. Keys of
        jobs that just finished (``finished``) stay: the event emitted next removes them.
        """
        keys = [k for k in self.running if isinstance(k, TaskInstanceKey) and k not in finished]
        if not keys:
            return
        open_keys = {job_key(job) for job in store.jobs_for_keys(session, map(key_tuple, keys))}
        for key in keys:
            if key not in open_keys:
                self.log.debug("Forgetting %s: it has no open edge-agent job", key)
                self.running.discard(key)

    # ----------------------------------------------------------------------------------------------
    # Revocation and adoption
    # ----------------------------------------------------------------------------------------------

    def revoke_task(self, *, ti: TaskInstance) -> None:
        """Cancel the try's job; an agent running it loses the lease at its next heartbeat.

        Called by the scheduler's stuck-in-queued handler; must not raise and must not emit events.
        """
        key = ti.key
        self.running.discard(key)
        self.queued_tasks.pop(key, None)
        try:
            # Not the scoped session: the scheduler holds it (with `ti` attached) around this call,
            # and create_session() would commit and close it under the scheduler's feet.
            with create_session(scoped=False) as session:
                cancelled = store.cancel_job(
                    session,
                    dag_id=key.dag_id,
                    task_id=key.task_id,
                    run_id=key.run_id,
                    map_index=key.map_index,
                    try_number=key.try_number,
                )
        except SQLAlchemyError:
            self.log.exception("Could not cancel the edge-agent job of %s", key)
            return
        if cancelled:
            self.log.info("Cancelled the edge-agent job of %s", key)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Adopt the TIs whose job is still open; return the others for the scheduler to reset.

        An adopted key joins ``running``, so from the next sync this executor claims the try's
        events (a restarted scheduler reports what finished while the old one was gone).
        """
        if not tis:
            return []
        keys = {ti.key: ti for ti in tis}
        # Unscoped for the same reason as revoke_task: the caller's scoped session holds `tis`.
        with create_session(scoped=False) as session:
            open_keys = {job_key(job) for job in store.jobs_for_keys(session, map(key_tuple, keys))}
        rejected = []
        for key, ti in keys.items():
            if key in open_keys:
                self.running.add(key)
            else:
                rejected.append(ti)
        if open_keys:
            self.log.info("Adopted %d task instance(s) whose edge-agent job is still open", len(open_keys))
        return rejected

    # ----------------------------------------------------------------------------------------------
    # Logs (called by the api-server's log reader while a TI is RUNNING)
    # ----------------------------------------------------------------------------------------------

    def get_task_log(self, ti: TaskInstance | TaskInstanceHistory, try_number: int) -> tuple[list[str], list[str]]:
        """Name the log's source so Airflow's reader does not try ``http://<agent-host>:8793``.

        A non-empty source list is what stops the reader from contacting a worker log server,
        which agents never run; the log itself is read from the hosted log folder the gateway
        appends shipped chunks to.
        """
        key: KeyTuple = (ti.dag_id, ti.task_id, ti.run_id, ti.map_index, try_number)
        try:
            with create_session(scoped=False) as session:
                job = next((j for j in store.jobs_for_keys(session, [key]) if j.agent_id), None)
                if job is not None:
                    notice = self._local_log_notice(session, job)
                    if notice is not None:
                        return [notice], []
        except SQLAlchemyError:
            job = None
        if job is not None:
            return [f"Task ran on edge agent {job.agent_id}; log shipped to the hosted log folder"], []
        return ["Task runs on an edge agent; its log is shipped to the hosted log folder"], []

    @staticmethod
    def _local_log_notice(session: Session, job: store.Job) -> str | None:
        """Where the log is, for a queue whose policy keeps logs in the agent's region (else None).

        Once the try has ended the gateway's ``.location`` file says the same in the log itself.
        """
        from executor_plugin.policy import LOGS_LOCAL
        from executor_plugin.ui.log_notice import local_log_notice

        policy = store.get_queue_policy(session, job.queue)
        if policy is None or policy.logs != LOGS_LOCAL or job.agent_id is None:
            return None
        agent = store.get_agent(session, job.agent_id)
        try:
            log_path = str(json.loads(job.workload).get("log_path") or "?")
        except ValueError:
            log_path = "?"
        return local_log_notice(agent_name=agent.name if agent else job.agent_id, agent_id=job.agent_id,
                                queue=job.queue, log_path=log_path)

def _warn_if_db_manager_unregistered() -> None:
    """Warn when ``airflow db migrate`` will not manage our tables (provider metadata missing)."""
    from airflow.configuration import conf
    from airflow.providers_manager import ProvidersManager

    from executor_plugin.db_manager import manager_path

    registered: set[str] = set(ProvidersManager().db_managers)
    configured: Iterable[str] = conf.get("database", "external_db_managers", fallback="").split(",")
    registered |= {name.strip() for name in configured if name.strip()}
    if manager_path() not in registered:
        warnings.warn(
            f"{manager_path()} is not registered, so 'airflow db migrate' will not manage the edge-agent "
            "tables. Install the edge-agent distribution (it registers the manager through its provider "
            f"info) or add it to [database] external_db_managers.",
            UserWarning,
            stacklevel=2,
        )


__all__ = ["EdgeAgentExecutor", "job_key", "key_tuple"]
