"""EdgeAgentExecutor: dead agents, and event routing between schedulers sharing one database.

Real SQLite file, real store; the fixtures and builders are those of test_executor.py. Two
``EdgeAgentExecutor`` instances on one database stand for two schedulers (or a scheduler before
and after a restart).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from test_executor import (  # noqa: F401  (fixtures)
    db,
    empty_db,
    executor,
    jobs,
    lease,
    make_agent,
    make_workload,
    queue,
    report,
    session,
)

from airflow.utils.state import TaskInstanceState

from executor_plugin import store
from executor_plugin.executor import UNCLAIMED_EVENT_TTL, EdgeAgentExecutor, unclaimed_event_ttl
from executor_plugin.models import JobStatus, job_table
from executor_plugin.settings import SettingsError


def ago(seconds: float):
    return store.utcnow() - timedelta(seconds=seconds)


def beat(session, agent, *, at=None, running=()):
    lost = store.record_heartbeat(
        session, agent.id, free_slots=1, total_slots=1, version="t", cert_not_after=None,
        running=list(running), lease_ttl=timedelta(minutes=5), now=at,
    )
    session.commit()
    return lost


def set_ti_state(session, workload, state: str) -> None:
    from airflow.models.taskinstance import TaskInstance

    table = TaskInstance.__table__
    session.execute(update(table).where(table.c.id == workload.ti.id).values(state=state))
    session.commit()


class RecordingLog:
    """Stands in for the executor's structlog logger (which writes to stdout, not to caplog)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _record(self, level: str, msg: str, *args, **_kwargs) -> None:
        self.lines.append((level, msg % args if args else msg))

    def debug(self, msg, *args, **kwargs):
        self._record("debug", msg, *args)

    def info(self, msg, *args, **kwargs):
        self._record("info", msg, *args)

    def warning(self, msg, *args, **kwargs):
        self._record("warning", msg, *args)

    def exception(self, msg, *args, **kwargs):
        self._record("error", msg, *args)

    def messages(self, level: str, contains: str) -> list[str]:
        return [text for lvl, text in self.lines if lvl == level and contains in text]


def recording(executor: EdgeAgentExecutor) -> RecordingLog:
    log = RecordingLog()
    executor._log = log
    return log


def row(session, job_id):
    return session.execute(select(job_table).where(job_table.c.id == job_id)).one()


# ---------------------------------------------------------------------------------------------------
# The setting
# ---------------------------------------------------------------------------------------------------


def test_agent_dead_after_defaults_to_30_seconds(executor):
    assert executor.agent_dead_after == timedelta(seconds=30)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_agent_dead_after_stops_the_executor_at_start(db, monkeypatch, value):
    monkeypatch.setenv("AIRFLOW__EDGE_AGENT__AGENT_DEAD_AFTER_SECONDS", value)
    with pytest.raises(SettingsError, match=r"\[edge_agent\] agent_dead_after_seconds must be .* greater than 0"):
        EdgeAgentExecutor().start()


def test_agent_dead_after_is_read_from_the_config(db, monkeypatch):
    monkeypatch.setenv("AIRFLOW__EDGE_AGENT__AGENT_DEAD_AFTER_SECONDS", "2.5")
    assert EdgeAgentExecutor().agent_dead_after == timedelta(seconds=2.5)


# ---------------------------------------------------------------------------------------------------
# Dead agents
# ---------------------------------------------------------------------------------------------------


def test_sync_requeues_the_leased_jobs_of_a_dead_agent_at_once(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    beat(session, agent, at=ago(50))
    held = lease(session, agent, now=ago(45))  # the lease itself (5 min) has not lapsed

    log = recording(executor)
    executor.sync()

    [r] = jobs(session)
    assert (r["state"], r["agent_id"], r["fencing"]) == (JobStatus.QUEUED, None, held.fencing + 1)
    lines = log.messages("warning", "missed heartbeats")
    assert len(lines) == 1
    assert lines[0].startswith("Agent agent-1 (agent-1) missed heartbeats for 4")
    assert lines[0].endswith(" s: requeued 1 job(s) it had not started")
    assert executor.get_event_buffer() == {}  # a requeue is no event
    assert workload.ti.key in executor.running  # the try is still queued: it keeps its slot
    # The old agent's report with the old fencing is refused; its heartbeat names the job lost.
    with pytest.raises(store.JobNotFound):
        store.report_job(session, agent.id, held.id, held.fencing, JobStatus.RUNNING)
    assert beat(session, agent, running=[(held.id, held.fencing)]) == [held.id]


def test_busy_syncs_look_for_dead_agents_once_a_second_and_for_events_every_time(executor, session, monkeypatch):
    # A busy scheduler syncs many times a second; the liveness UPDATEs are not needed that often.
    calls = {"expired": 0, "offline": 0, "events": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(store, "requeue_expired_leases", counting("expired", store.requeue_expired_leases))
    monkeypatch.setattr(store, "requeue_leased_of_offline_agents",
                        counting("offline", store.requeue_leased_of_offline_agents))
    monkeypatch.setattr(store, "pending_events", counting("events", store.pending_events))
    for _ in range(5):
        executor.sync()
    assert calls == {"expired": 1, "offline": 1, "events": 5}

    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    beat(session, agent, at=ago(50))
    lease(session, agent, now=ago(45))
    executor._next_liveness = 0.0  # a second later
    executor.sync()
    assert calls == {"expired": 2, "offline": 2, "events": 6}
    [r] = jobs(session)
    assert (r["state"], r["agent_id"]) == (JobStatus.QUEUED, None)  # the dead agent's lease came back


def test_sync_closes_a_dead_agents_running_job_once_airflow_failed_its_ti(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    beat(session, agent, at=ago(120))
    held = lease(session, agent, now=ago(100))
    store.report_job(session, agent.id, held.id, held.fencing, JobStatus.RUNNING, now=ago(99))
    session.commit()
    set_ti_state(session, workload, "running")
    executor.sync()
    assert executor.get_event_buffer() == {workload.ti.key: (TaskInstanceState.RUNNING, agent.id)}

    # Airflow's task heartbeat timeout fails the try (the scheduler does not always release the slot).
    set_ti_state(session, workload, "failed")
    executor._next_reconcile = 0.0  # the next sync checks settled task instances
    log = recording(executor)
    executor.sync()

    r = row(session, held.id)
    assert (r.state, r.reported_state) == (JobStatus.FAILED, JobStatus.FAILED)
    assert "went offline; Airflow settled the task instance as failed" in r.reason
    assert executor.get_event_buffer() == {}  # closed without an event
    [line] = log.messages("info", "Closed running job")
    assert held.id in line and "went offline" in line
    executor.sync()
    assert workload.ti.key not in executor.running  # its parallelism slot is free


def test_sync_never_closes_a_running_job_of_an_online_agent(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    held = lease(session, agent, now=ago(100))
    report(session, agent, held, "running")
    beat(session, agent)
    set_ti_state(session, workload, "success")  # the task reported to Airflow; the agent not yet

    executor.sync()
    assert row(session, held.id).state == JobStatus.RUNNING
    executor.get_event_buffer()

    report(session, agent, held, "success", exit_code=0)  # the agent's own final report is accepted
    executor.sync()
    assert executor.get_event_buffer() == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}


# ---------------------------------------------------------------------------------------------------
# Events go to the scheduler that holds the try
# ---------------------------------------------------------------------------------------------------


def test_only_the_executor_holding_the_key_emits_its_events(db, session):
    scheduler_a, scheduler_b = EdgeAgentExecutor(), EdgeAgentExecutor()
    wl_a, wl_b = make_workload("ta"), make_workload("tb")
    queue(scheduler_a, session, wl_a)
    queue(scheduler_b, session, wl_b)
    agent = make_agent(session)
    for _ in range(2):
        job = lease(session, agent)
        report(session, agent, job, "failed", reason="bundle missing on agent")  # failed before start

    scheduler_b.sync()
    assert scheduler_b.get_event_buffer() == {
        wl_b.ti.key: (TaskInstanceState.FAILED, "bundle missing on agent")
    }
    # B did not consume A's event: Airflow would have ignored it (queued_by_job_id is A's).
    assert {r["task_id"]: r["reported_state"] for r in jobs(session)} == {"ta": None, "tb": JobStatus.FAILED}

    scheduler_a.sync()
    assert scheduler_a.get_event_buffer() == {
        wl_a.ti.key: (TaskInstanceState.FAILED, "bundle missing on agent")
    }
    scheduler_b.sync()
    assert scheduler_b.get_event_buffer() == {}


def test_unclaimed_events_are_dropped_after_ten_minutes(db, session):
    gone, alive = EdgeAgentExecutor(), EdgeAgentExecutor()  # `gone` queued the tries, then died
    old, recent = make_workload("old"), make_workload("recent")
    queue(gone, session, old)
    queue(gone, session, recent)
    agent = make_agent(session)
    for _ in range(2):
        job = lease(session, agent)
        finished = ago(11 * 60) if job.task_id == "old" else ago(5 * 60)
        report(session, agent, job, "failed", reason="boom", now=finished)

    log = recording(alive)
    alive.sync()

    assert alive.get_event_buffer() == {}
    assert {r["task_id"]: r["reported_state"] for r in jobs(session)} == {"old": JobStatus.FAILED, "recent": None}
    [dropped] = log.messages("debug", "no scheduler claimed it")
    assert dropped.startswith("Dropping the failed event of ") and "task_id='old'" in dropped
    assert unclaimed_event_ttl() == UNCLAIMED_EVENT_TTL == timedelta(minutes=10)  # at Airflow's defaults


def test_unclaimed_ttl_outlasts_a_slow_adoption(db, monkeypatch):
    monkeypatch.setenv("AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL", "900")
    assert unclaimed_event_ttl() == timedelta(seconds=900 + 30 + 60)


def test_a_restarted_scheduler_adopts_and_reports_what_finished_meanwhile(db, session):
    old_scheduler = EdgeAgentExecutor()
    failed_wl, running_wl, queued_wl = make_workload("failed"), make_workload("running"), make_workload("queued")
    for wl in (failed_wl, running_wl, queued_wl):
        queue(old_scheduler, session, wl)
    agent = make_agent(session)
    leased = {}
    for _ in range(2):
        job = lease(session, agent)
        leased[job.task_id] = job
    failed_job = leased.get("failed") or next(iter(leased.values()))
    # Whatever leased first: one fails before start, the other runs.
    other_job = next(job for job in leased.values() if job.id != failed_job.id)
    report(session, agent, failed_job, "failed", reason="bundle missing on agent")
    report(session, agent, other_job, "running")
    by_task = {"failed": failed_wl, "running": running_wl, "queued": queued_wl}

    restarted = EdgeAgentExecutor()  # new scheduler job: nothing in memory
    restarted.sync()
    assert restarted.get_event_buffer() == {}  # not its tries (yet): the events wait

    rejected = restarted.try_adopt_task_instances([failed_wl.ti, running_wl.ti, queued_wl.ti])
    assert list(rejected) == []
    restarted.sync()
    assert restarted.get_event_buffer() == {
        by_task[failed_job.task_id].ti.key: (TaskInstanceState.FAILED, "bundle missing on agent"),
        by_task[other_job.task_id].ti.key: (TaskInstanceState.RUNNING, agent.id),
    }
    assert {key.task_id for key in restarted.running} == {other_job.task_id, "queued"} - {failed_job.task_id}


def test_a_key_dropped_by_the_scheduler_leaves_its_late_event_unclaimed(executor, session):
    # The scheduler's own heartbeat-timeout path removes the key (change_state FAILED); a late
    # report of that try is nobody's event any more, and is dropped once old.
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)
    report(session, agent, job, "running")
    executor.sync()
    executor.get_event_buffer()
    executor.change_state(workload.ti.key, TaskInstanceState.FAILED, remove_running=True)
    executor.get_event_buffer()

    report(session, agent, job, "failed", reason="late", now=ago(11 * 60))
    executor.sync()
    assert executor.get_event_buffer() == {}
    assert row(session, job.id).reported_state == JobStatus.FAILED


def test_adopted_key_whose_job_was_purged_is_forgotten(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    session.execute(delete(job_table))
    session.commit()
    executor.sync()
    assert executor.running == set()
