"""EdgeAgentExecutor against a real SQLite database, driven through the real store functions.

Airflow's session factories (``settings.engine``/``Session``/``NonScopedSession``) are pointed at
a temp SQLite file per test, so the executor runs exactly the code it runs in the scheduler.
Executor loading from ``[core] executor`` runs in subprocesses (ExecutorLoader caches globally).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from datetime import timedelta
from pathlib import Path

import pytest

# Before anything imports Airflow: never let the test process touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from sqlalchemy import create_engine, inspect  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

from airflow import settings  # noqa: E402
from airflow.executors import workloads  # noqa: E402
from airflow.executors.workloads.base import BundleInfo  # noqa: E402
from airflow.executors.workloads.task import TaskInstanceDTO  # noqa: E402
from airflow.models.taskinstancekey import TaskInstanceKey  # noqa: E402
from airflow.utils.state import TaskInstanceState  # noqa: E402

from executor_plugin import store  # noqa: E402
from executor_plugin.db_manager import VERSION_TABLE, EdgeAgentDBManager  # noqa: E402
from executor_plugin.executor import EdgeAgentExecutor  # noqa: E402
from executor_plugin.models import JobStatus, job_table, metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------
# Fixtures and builders
# ---------------------------------------------------------------------------------------------------


def _point_airflow_at(monkeypatch: pytest.MonkeyPatch, url: str):
    engine = create_engine(url, connect_args={"check_same_thread": False})
    monkeypatch.setattr(settings, "engine", engine)
    monkeypatch.setattr(settings, "NonScopedSession", sessionmaker(bind=engine, expire_on_commit=False))
    monkeypatch.setattr(settings, "Session", scoped_session(sessionmaker(bind=engine, expire_on_commit=False)))
    return engine


@pytest.fixture
def empty_db(tmp_path, monkeypatch):
    """Airflow's session factories bound to an empty SQLite file."""
    engine = _point_airflow_at(monkeypatch, f"sqlite:///{tmp_path / 'airflow.db'}")
    yield engine
    settings.Session.remove()
    engine.dispose()


@pytest.fixture
def db(empty_db):
    from airflow.models import import_all_models
    from airflow.models.taskinstance import TaskInstance

    import_all_models()  # resolves task_instance's foreign keys
    metadata.create_all(empty_db)
    # Airflow's own task_instance table (SQLite does not enforce its foreign keys): the executor
    # checks queued jobs against it.
    TaskInstance.__table__.create(empty_db)
    return empty_db


@pytest.fixture
def session(db):
    s = settings.NonScopedSession()
    yield s
    s.rollback()
    s.close()


@pytest.fixture
def executor(db):
    return EdgeAgentExecutor()


def make_workload(
    task_id: str = "t1", *, try_number: int = 1, map_index: int = -1, queue: str = "eu", priority: int = 1
) -> workloads.ExecuteTask:
    ti = TaskInstanceDTO(
        id=uuid.uuid4(),
        dag_id="dag",
        task_id=task_id,
        run_id="run1",
        try_number=try_number,
        map_index=map_index,
        dag_version_id=uuid.uuid4(),
        queue=queue,
        pool_slots=1,
        priority_weight=priority,
    )
    return workloads.ExecuteTask(
        ti=ti,
        dag_rel_path="dag.py",
        token="workload-token",
        bundle_info=BundleInfo(name="dags-folder"),
        log_path=f"dag_id=dag/run_id=run1/task_id={task_id}/attempt={try_number}.log",
    )


def make_agent(session, agent_id: str = "agent-1", queues=("eu",)) -> store.Agent:
    token = store.create_token(
        session,
        token_id=f"tok-{agent_id}",
        secret_hash=store.hash_secret("secret"),
        queues=list(queues),
        region="eu-west-1",
        name=None,
        ttl=timedelta(hours=1),
        max_uses=1,
    )
    agent = store.create_agent(session, agent_id=agent_id, name=agent_id, token=token, pubkey_fp=f"fp-{agent_id}")
    session.commit()
    return agent


def queue(executor: EdgeAgentExecutor, session, workload: workloads.ExecuteTask) -> None:
    """What the scheduler does: queue in its session, then commit with the TI's QUEUED state."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import insert

    ti = workload.ti
    session.execute(
        insert(TaskInstance.__table__).values(
            id=ti.id, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index,
            try_number=ti.try_number, pool="default_pool", state="queued",
        )
    )
    executor.queue_workload(workload, session=session)
    session.commit()


def lease(session, agent: store.Agent, **kwargs) -> store.Job:
    job = store.lease_next(session, agent, lease_ttl=kwargs.pop("lease_ttl", timedelta(minutes=1)), **kwargs)
    assert job is not None
    return job


def report(session, agent: store.Agent, job: store.Job, state: str, **kwargs) -> None:
    store.report_job(session, agent.id, job.id, job.fencing, state, **kwargs)
    session.commit()


def jobs(session) -> list[dict]:
    return [dict(r._mapping) for r in session.execute(job_table.select())]


# ---------------------------------------------------------------------------------------------------
# Queueing
# ---------------------------------------------------------------------------------------------------


def test_queue_workload_writes_a_job_and_takes_a_slot(executor, session):
    workload = make_workload(priority=7)
    queue(executor, session, workload)

    [row] = jobs(session)
    assert row["state"] == JobStatus.QUEUED
    assert (row["dag_id"], row["task_id"], row["run_id"], row["map_index"], row["try_number"]) == (
        "dag", "t1", "run1", -1, 1,
    )
    assert row["ti_id"] == str(workload.ti.id)
    assert row["queue"] == "eu"
    assert row["priority_weight"] == 7
    stored = workloads.ExecuteTask.model_validate_json(row["workload"])
    assert stored.token == ""  # no live credential at rest; the gateway mints one per lease
    assert stored == workload.model_copy(update={"token": ""})
    assert executor.running == {workload.ti.key}
    assert executor.slots_occupied == 1
    # Nothing is held in memory for _process_workloads: the job row is the queue.
    assert executor.queued_tasks == {}


def test_queue_workload_is_part_of_the_schedulers_transaction(executor, session):
    workload = make_workload()
    executor.queue_workload(workload, session=session)
    session.rollback()  # the scheduler's critical section failed

    assert jobs(session) == []
    # The key was counted before the commit; sync gives the slot back since no job backs it.
    executor.sync()
    assert executor.running == set()


def test_queue_workload_refuses_other_workload_types(executor, session):
    test_connection = workloads.TestConnection(
        token="t", connection_test_id=uuid.uuid4(), connection_id="my_conn", timeout=10
    )
    with pytest.raises(NotImplementedError, match="runs tasks only"):
        executor.queue_workload(test_connection, session=session)
    assert jobs(session) == []
    assert executor.supports_callbacks is False
    assert executor.supports_connection_test is False


# ---------------------------------------------------------------------------------------------------
# Sync: job states become scheduler events, once each
# ---------------------------------------------------------------------------------------------------


def test_sync_reports_running_then_success_once(executor, session):
    workload = make_workload()
    key = workload.ti.key
    queue(executor, session, workload)
    agent = make_agent(session)

    executor.sync()
    assert executor.get_event_buffer() == {}  # queued and leased are not events

    job = lease(session, agent)
    executor.sync()
    assert executor.get_event_buffer() == {}

    report(session, agent, job, "running")
    executor.sync()
    assert executor.get_event_buffer() == {key: (TaskInstanceState.RUNNING, agent.id)}
    assert key in executor.running  # running_state keeps the slot

    executor.sync()
    assert executor.get_event_buffer() == {}  # already reported

    report(session, agent, job, "success", exit_code=0)
    executor.sync()
    assert executor.get_event_buffer() == {key: (TaskInstanceState.SUCCESS, None)}
    assert executor.running == set()

    executor.sync()
    assert executor.get_event_buffer() == {}
    [row] = jobs(session)
    assert row["reported_state"] == JobStatus.SUCCESS


def test_sync_reports_failure_with_reason(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)

    report(session, agent, job, "failed", exit_code=None, reason="bundle 'dags-folder' not configured on agent")
    executor.sync()
    assert executor.get_event_buffer() == {
        workload.ti.key: (TaskInstanceState.FAILED, "bundle 'dags-folder' not configured on agent")
    }
    assert executor.running == set()


def test_sync_reports_only_the_latest_state(executor, session):
    # Running and success both happened between two heartbeats: only the outcome is an event.
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)
    report(session, agent, job, "running")
    report(session, agent, job, "success", exit_code=0)

    executor.sync()
    assert executor.get_event_buffer() == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}


def test_sync_requeues_lapsed_leases(executor, session):
    queue(executor, session, make_workload())
    agent = make_agent(session)
    long_ago = store.utcnow() - timedelta(minutes=10)
    job = lease(session, agent, now=long_ago)

    executor.sync()

    [row] = jobs(session)
    assert row["state"] == JobStatus.QUEUED
    assert row["agent_id"] is None
    assert row["fencing"] > job.fencing  # a late report from the old lease holder is refused
    with pytest.raises((store.StaleFencing, store.JobNotFound)):
        store.report_job(session, agent.id, job.id, job.fencing, "running")
    assert executor.get_event_buffer() == {}


def test_sync_purges_reported_jobs_after_an_hour(executor, session):
    old, recent = make_workload("old"), make_workload("recent")
    queue(executor, session, old)
    queue(executor, session, recent)
    agent = make_agent(session)
    two_hours_ago = store.utcnow() - timedelta(hours=2)
    for _ in range(2):
        job = lease(session, agent)
        finished_at = two_hours_ago if job.task_id == "old" else None
        report(session, agent, job, "success", exit_code=0, now=finished_at)

    executor.sync()

    assert set(executor.get_event_buffer()) == {old.ti.key, recent.ti.key}
    assert [row["task_id"] for row in jobs(session)] == ["recent"]


def test_sync_survives_database_errors(executor, session, monkeypatch, tmp_path):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)
    report(session, agent, job, "success", exit_code=0)

    working = settings.NonScopedSession
    # A database the scheduler cannot open (the path is a directory): sync must log, not raise.
    (tmp_path / "not-a-db").mkdir()
    broken = create_engine(f"sqlite:///{tmp_path / 'not-a-db'}")
    monkeypatch.setattr(settings, "NonScopedSession", sessionmaker(bind=broken))
    executor.sync()
    executor.sync()  # a second failure in a row logs one line instead of another traceback
    assert executor.get_event_buffer() == {}

    # The next heartbeat with a working database reports what was missed.
    monkeypatch.setattr(settings, "NonScopedSession", working)
    executor.sync()
    assert executor.get_event_buffer() == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}
    broken.dispose()


# ---------------------------------------------------------------------------------------------------
# Revocation and adoption
# ---------------------------------------------------------------------------------------------------


def test_revoke_task_cancels_the_job(executor, session):
    workload = make_workload()
    queue(executor, session, workload)

    executor.revoke_task(ti=workload.ti)

    [row] = jobs(session)
    assert row["state"] == JobStatus.CANCELLED
    assert executor.running == set()
    agent = make_agent(session)
    assert store.lease_next(session, agent, lease_ttl=timedelta(minutes=1)) is None
    executor.sync()
    assert executor.get_event_buffer() == {}  # revoke_task must not produce events


def test_revoke_task_of_a_leased_job_fences_out_the_agent(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)

    executor.revoke_task(ti=workload.ti)

    with pytest.raises(store.StaleFencing):
        store.report_job(session, agent.id, job.id, job.fencing, "running")


def test_revoke_task_without_a_job_is_harmless(executor, session):
    executor.revoke_task(ti=make_workload().ti)
    assert jobs(session) == []


def test_try_adopt_adopts_open_jobs_and_returns_the_rest(executor, session):
    queued_wl, running_wl, finished_wl, unknown_wl = (make_workload(f"t{i}") for i in range(4))
    for wl in (queued_wl, running_wl, finished_wl):
        queue(executor, session, wl)
    agent = make_agent(session)
    job = lease(session, agent)  # leases t0 or t1 or t2: all equal priority; find which
    report(session, agent, job, "running")
    other = lease(session, agent)
    report(session, agent, other, "success", exit_code=0)
    finished_task = other.task_id
    # Finished but not reported yet (the old scheduler died first): still adopted, so the new
    # scheduler reports its outcome instead of resetting the TI and running the try again.
    unreported = {"t0", "t1", "t2"}

    restarted = EdgeAgentExecutor()  # a new scheduler: nothing in memory
    tis = [queued_wl.ti, running_wl.ti, finished_wl.ti, unknown_wl.ti]
    rejected = restarted.try_adopt_task_instances(tis)
    assert {ti.task_id for ti in rejected} == {"t3"}
    assert {key.task_id for key in restarted.running} == unreported

    store.mark_reported(session, other.id, "success")
    session.commit()
    again = EdgeAgentExecutor().try_adopt_task_instances(tis)
    assert {ti.task_id for ti in again} == {finished_task, "t3"}


def test_try_adopt_with_nothing_to_adopt(executor):
    assert list(executor.try_adopt_task_instances([])) == []


# ---------------------------------------------------------------------------------------------------
# Logs, life cycle
# ---------------------------------------------------------------------------------------------------


def test_get_task_log_names_a_source_so_airflow_skips_the_worker_log_server(executor, session):
    workload = make_workload()
    queue(executor, session, workload)
    sources, logs = executor.get_task_log(workload.ti, try_number=1)
    assert sources and logs == []

    agent = make_agent(session)
    job = lease(session, agent)
    report(session, agent, job, "running")
    sources, logs = executor.get_task_log(workload.ti, try_number=1)
    assert sources == ["Task ran on edge agent agent-1; log shipped to the hosted log folder"]
    assert logs == []


def test_flags_and_stops(executor):
    assert EdgeAgentExecutor.is_local is False
    assert EdgeAgentExecutor.serve_logs is False
    executor.end()
    executor.terminate()


def test_start_creates_missing_tables_once(empty_db):
    assert not inspect(empty_db).has_table("edge_agent_job")
    executor = EdgeAgentExecutor()
    with warnings.catch_warnings():
        # The manager is registered through our provider info: no warning about it.
        warnings.filterwarnings("error", message=".*EdgeAgentDBManager is not registered.*")
        executor.start()

    tables = set(inspect(empty_db).get_table_names())
    assert set(metadata.tables) | {VERSION_TABLE} <= tables
    with settings.NonScopedSession() as s:
        assert EdgeAgentDBManager(s).check_migration()
    executor.start()  # at head: nothing to do


# ---------------------------------------------------------------------------------------------------
# Loading through [core] executor (subprocesses: ExecutorLoader caches in module globals)
# ---------------------------------------------------------------------------------------------------

_LOADER_PROBE = """
import json, sys
from airflow.executors.executor_loader import ExecutorLoader
names = [str(n.module_path) for n in ExecutorLoader.get_executor_names(validate_teams=False)]
by_class = ExecutorLoader.load_executor("EdgeAgentExecutor")
default = ExecutorLoader.get_default_executor_name()
print(json.dumps({"names": names, "by_class": type(by_class).__name__, "default": default.module_path}))
"""


def _probe_loader(tmp_path: Path, executor_setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR=executor_setting,
    )
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER_PROBE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loads_as_the_only_executor(tmp_path):
    found = _probe_loader(tmp_path, "executor_plugin.EdgeAgentExecutor")
    assert found == {
        "names": ["executor_plugin.EdgeAgentExecutor"],
        "by_class": "EdgeAgentExecutor",
        "default": "executor_plugin.EdgeAgentExecutor",
    }


def test_loads_next_to_local_executor(tmp_path):
    found = _probe_loader(tmp_path, "LocalExecutor,executor_plugin.EdgeAgentExecutor")
    assert found["names"][1] == "executor_plugin.EdgeAgentExecutor"
    assert found["by_class"] == "EdgeAgentExecutor"  # what executor="EdgeAgentExecutor" resolves to
    assert found["default"].endswith("LocalExecutor")


def test_importing_the_package_does_not_import_airflow(tmp_path):
    probe = "import sys, executor_plugin; print('airflow' in sys.modules, 'sqlalchemy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_task_instance_key_order_is_what_the_executor_assumes():
    # TaskInstanceKey orders try_number before map_index; the store orders map_index first.
    from executor_plugin.executor import key_tuple

    key = TaskInstanceKey("d", "t", "r", try_number=3, map_index=5)
    assert key_tuple(key) == ("d", "t", "r", 5, 3)


def test_sync_cancels_queued_jobs_whose_ti_was_settled_by_hand(executor, session):
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import delete, update

    kept, settled, deleted = (make_workload(f"t{i}") for i in range(3))
    for wl in (kept, settled, deleted):
        queue(executor, session, wl)
    table = TaskInstance.__table__
    session.execute(update(table).where(table.c.id == settled.ti.id).values(state="failed"))
    session.execute(delete(table).where(table.c.id == deleted.ti.id))
    session.commit()

    executor.sync()

    by_task = {row["task_id"]: row for row in jobs(session)}
    assert by_task["t0"]["state"] == JobStatus.QUEUED
    assert by_task["t1"]["state"] == JobStatus.CANCELLED  # marked failed while queued
    assert by_task["t2"]["state"] == JobStatus.CANCELLED  # its run was deleted
    assert "no longer queued" in by_task["t1"]["reason"]


def test_get_task_log_says_where_a_local_log_is(executor, session):
    """A queue whose policy keeps logs in the region: the log view names the agent and the file."""
    store.set_queue_policy(session, "eu", regions=None, logs="local")
    session.commit()
    workload = make_workload()
    queue(executor, session, workload)
    agent = make_agent(session)
    job = lease(session, agent)
    report(session, agent, job, "running")
    sources, logs = executor.get_task_log(workload.ti, try_number=1)
    (notice,) = sources
    assert "keeps task logs local" in notice and f"({agent.id})" in notice
    assert workload.log_path and workload.log_path in notice
    assert logs == []
