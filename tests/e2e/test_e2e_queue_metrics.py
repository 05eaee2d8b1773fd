"""Per-queue metrics from the running scheduler's executor, through Airflow's StatsD client, on the e2e stack.

Every hosted component of the stack has ``[metrics] statsd_on`` pointed at a UDP collector on
loopback (``conftest.StatsdCollector``). After a task ran on the ``default`` queue's agent, the
scheduler's next emissions (every ``queue_metrics.EMIT_EVERY`` s) must carry that queue's gauges,
with the serving agent online and its slots, and a lease-latency timing for the job it leased.
``tests/unit/test_queue_metrics.py`` checks the figures themselves; here the point is the real
scheduler, its executor's sync loop and Airflow's own metrics configuration.
"""

from __future__ import annotations

import re

import pytest

from conftest import DEFAULT_QUEUE

pytestmark = pytest.mark.e2e

#: Two emission periods and a scheduler loop, with room for a loaded machine.
WAIT = 90.0


def _values(lines: list[str], metric: str, kind: str) -> list[float]:
    pattern = re.compile(rf"airflow\.edge_agent\.queue\.{re.escape(DEFAULT_QUEUE)}\.{metric}:([-0-9.]+)\|{kind}$")
    return [float(m.group(1)) for line in lines if (m := pattern.match(line))]


def test_the_scheduler_emits_the_default_queues_metrics_to_statsd(e2e, statsd) -> None:
    since = statsd.mark()
    e2e.run("e2e_python_operator")
    lines = statsd.wait_for(
        lambda ls: _values(ls, "lease_latency", "ms") and _values(ls, "agents_online", "g"), WAIT, since
    )
    latencies = _values(lines, "lease_latency", "ms")
    assert all(0 <= ms < 240_000 for ms in latencies), latencies  # queued -> leased of the run's job
    assert max(_values(lines, "agents_online", "g")) >= 1  # the e2e agent serves "default"
    assert max(_values(lines, "free_slots", "g")) >= 1
    assert _values(lines, "queued_jobs", "g") and _values(lines, "running_jobs", "g")
