"""Per-queue metrics: figures read from a real SQLite store, emitted through Airflow's real StatsD client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import sessionmaker

from executor_plugin import store
from executor_plugin.models import agent_table, metadata
from executor_plugin.queue_metrics import QueueMetrics, collect, stat_name


@pytest.fixture
def session(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    metadata.create_all(engine)
    s = sessionmaker(bind=engine, expire_on_commit=False)()
    yield s
    s.close()
    engine.dispose()


def _job(s, queue: str, task: str) -> str:
    job_id = store.enqueue_job(
        s, workload_json="{}", ti_id="00000000-0000-0000-0000-000000000001", dag_id="d", task_id=task, run_id="r",
        map_index=-1, try_number=1, queue=queue, priority_weight=1,
    )
    s.commit()
    return job_id


def _agent(s, key: str, queues: tuple[str, ...], *, free: int, beat_age: float | None):
    token = store.create_token(s, token_id=f"t{key}", secret_hash=store.hash_secret("x"), queues=queues, region="r",
                               name=None, ttl=timedelta(hours=1), max_uses=1)
    agent = store.create_agent(s, agent_id=f"ag_{key}", name=key, token=token, pubkey_fp=key)
    if beat_age is not None:
        s.execute(update(agent_table).where(agent_table.c.id == agent.id).values(
            slots_free=free, last_heartbeat=store.utcnow() - timedelta(seconds=beat_age)))
    s.commit()
    return store.get_agent(s, agent.id)


class Recorder:
    def __init__(self) -> None:
        self.gauges: dict[str, float] = {}
        self.timings: list[tuple[str, timedelta]] = []
        self.tags: set[str] = set()

    def gauge(self, name, value, *, tags=None):
        self.gauges[name] = value
        self.tags.add(tags["queue"])

    def timing(self, name, dt, *, tags=None):
        self.timings.append((name, dt))


def test_figures_per_queue(session) -> None:
    for i in range(3):
        _job(session, "gpu", f"g{i}")
    _job(session, "eu pii", "p")
    online = _agent(session, "a", ("gpu", "eu pii"), free=2, beat_age=1)
    _agent(session, "b", ("gpu",), free=5, beat_age=300)  # offline: not counted
    _agent(session, "c", ("gpu",), free=1, beat_age=None)  # never seen
    leased = store.lease_next(session, online, lease_ttl=timedelta(seconds=60))
    assert leased is not None
    now = store.utcnow()
    figures = collect(session, now=now, online_after=now - timedelta(seconds=30),
                      leased_since=now - timedelta(minutes=1))
    gpu = figures[leased.queue] if leased.queue == "gpu" else figures["gpu"]
    assert (figures["gpu"].queued_jobs + figures["eu pii"].queued_jobs) == 3
    assert gpu.agents_online == 1 and gpu.free_slots == 2
    assert figures["eu pii"].agents_online == 1
    assert figures[leased.queue].running_jobs == 1
    assert len(figures[leased.queue].lease_latencies) == 1
    assert figures[leased.queue].lease_latencies[0] >= timedelta(0)


def test_emits_names_tags_and_a_final_zero(session) -> None:
    _job(session, "eu pii", "p")
    agent = _agent(session, "a", ("eu pii",), free=3, beat_age=0)
    ticks = iter([0.0, 0.0, 5.0, 20.0, 20.0])
    rec = Recorder()
    metrics = QueueMetrics(timedelta(seconds=30), every=10, clock=lambda: next(ticks), stats=rec)
    assert metrics.maybe_emit(session, store.utcnow())
    assert rec.gauges[stat_name("eu pii", "queued_jobs")] == 1
    assert stat_name("eu pii", "queued_jobs") == "edge_agent.queue.eu_pii.queued_jobs"
    assert rec.tags == {"eu pii"}
    assert not metrics.maybe_emit(session, store.utcnow())  # within the interval
    lease = store.lease_next(session, agent, lease_ttl=timedelta(seconds=60))
    store.report_job(session, agent.id, lease.id, lease.fencing, "running")
    store.report_job(session, agent.id, lease.id, lease.fencing, "success")
    store.revoke_agent(session, agent.id)
    session.commit()
    rec.gauges.clear()
    assert metrics.maybe_emit(session, store.utcnow() + timedelta(seconds=1))
    # The queue emptied: it is emitted once more as zeros, so dashboards do not freeze on old values.
    assert rec.gauges[stat_name("eu pii", "queued_jobs")] == 0
    assert rec.gauges[stat_name("eu pii", "agents_online")] == 0
    assert [name for name, _ in rec.timings] == [stat_name("eu pii", "lease_latency")]


def test_real_statsd_packets(tmp_path) -> None:
    """Airflow's own StatsD client (``[metrics] statsd_on``) sends our gauges to a UDP listener."""
    db = tmp_path / "db.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    metadata.create_all(engine)
    s = sessionmaker(bind=engine)()
    _job(s, "gpu", "g")
    s.close()
    engine.dispose()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(60)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update({
            "AIRFLOW_HOME": str(tmp_path / "home"),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(udp.getsockname()[1]),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        })
        code = textwrap.dedent(f"""
            from datetime import timedelta
            from sqlalchemy import create_engine
            from sqlalchemy.orm import sessionmaker
            from executor_plugin import store
            from executor_plugin.queue_metrics import QueueMetrics
            # What BaseExecutor.__init__ does in the scheduler before our sync ever runs.
            from airflow._shared.observability.metrics import stats
            from airflow.observability.metrics import stats_utils
            stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
            s = sessionmaker(bind=create_engine("sqlite:///{db}"))()
            assert QueueMetrics(timedelta(seconds=30)).maybe_emit(s, store.utcnow())
        """)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
        packets = set()
        udp.settimeout(5)
        try:
            while True:
                packets.add(udp.recv(4096).decode())
        except socket.timeout:
            pass
    assert "airflow.edge_agent.queue.gpu.queued_jobs:1|g" in packets, packets
    assert "airflow.edge_agent.queue.gpu.agents_online:0|g" in packets, packets
