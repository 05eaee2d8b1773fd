"""Agent observability: JSON log lines, the Prometheus exposition, and the health/metrics endpoint."""

from __future__ import annotations

import io
import json
import logging
import re
import socket

import httpx
import pytest

from edge_agent.errors import ConfigError
from edge_agent.observability import JsonFormatter, bind_agent, configure_logging, job_fields
from edge_agent.observability.endpoint import Check, ObservabilityServer
from edge_agent.observability.metrics import LEASE_WAIT_BUCKETS, METRICS, Metrics
from edge_agent.protocol import Lease


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("edge_agent.x", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_carries_agent_and_job_fields() -> None:
    bind_agent("agent-1", "vm-7")
    line = json.loads(JsonFormatter().format(_record("job %s exited", "j1", job_id="j1", dag_id="d", try_number=2)))
    assert line["message"] == "job j1 exited"
    assert line["level"] == "warning"
    assert (line["agent_id"], line["agent_name"]) == ("agent-1", "vm-7")
    assert (line["job_id"], line["dag_id"], line["try_number"]) == ("j1", "d", 2)
    assert "task_id" not in line  # only what the call passed


def test_json_line_keeps_exceptions_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]


def test_job_fields_from_a_lease() -> None:
    lease = Lease.model_validate({
        "job_id": "j", "fencing": 3, "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1,
        "try_number": 1, "queue": "q", "workload": {}, "lease_expires_at": "2026-01-01T00:00:00Z",
    })
    assert job_fields(lease) == {"job_id": "j", "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1,
                                 "try_number": 1, "queue": "q"}


def test_configure_logging_json_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    configure_logging(log_format="json")
    try:
        bind_agent("agent-2")
        logging.getLogger("edge_agent.test").info("hello", extra={"job_id": "j9"})
    finally:
        configure_logging()
    line = json.loads(err.getvalue().strip().splitlines()[-1])
    assert (line["message"], line["agent_id"], line["job_id"]) == ("hello", "agent-2", "j9")


def test_unknown_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="text, json"):
        configure_logging(log_format="xml")


# -- metrics ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+|\+Inf|NaN)$')


def _parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid exposition line: {line!r}"
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def test_exposition_counters_gauges_histogram() -> None:
    metrics = Metrics(lambda: {"edge_agent_jobs_running": 3, "edge_agent_slots_free": 1, "edge_agent_spool_jobs": None})
    metrics.inc("edge_agent_jobs_finished_total", state="success")
    metrics.inc("edge_agent_jobs_finished_total", state="success")
    metrics.inc("edge_agent_jobs_finished_total", state='fa"il')
    for seconds in (0.02, 0.2, 100.0):
        metrics.observe_lease_wait(seconds)
    metrics.observe_lease_wait(float("nan"))  # ignored
    text = metrics.render()
    samples = _parse(text)
    assert samples['edge_agent_jobs_finished_total{state="success"}'] == 2
    assert samples['edge_agent_jobs_finished_total{state="fa\\"il"}'] == 1
    assert samples["edge_agent_jobs_started_total"] == 0
    assert samples["edge_agent_jobs_running"] == 3
    assert "edge_agent_spool_jobs" not in samples  # unknown value: no sample rather than a lie
    assert samples['edge_agent_lease_wait_seconds_bucket{le="0.025"}'] == 1
    assert samples['edge_agent_lease_wait_seconds_bucket{le="0.25"}'] == 2
    assert samples['edge_agent_lease_wait_seconds_bucket{le="60"}'] == 2
    assert samples['edge_agent_lease_wait_seconds_bucket{le="+Inf"}'] == 3
    assert samples["edge_agent_lease_wait_seconds_count"] == 3
    assert samples["edge_agent_lease_wait_seconds_sum"] == pytest.approx(100.22)
    for name in METRICS:
        assert f"# TYPE {name} " in text
    assert len(LEASE_WAIT_BUCKETS) == len(set(LEASE_WAIT_BUCKETS))


def test_only_declared_counters_count() -> None:
    with pytest.raises(KeyError):
        Metrics().inc("edge_agent_jobs_running")


def test_a_failing_gauge_source_still_renders_counters() -> None:
    def broken() -> dict:
        raise RuntimeError("agent half torn down")

    metrics = Metrics(broken)
    metrics.inc("edge_agent_jobs_started_total")
    assert _parse(metrics.render())["edge_agent_jobs_started_total"] == 1


# -- endpoint -----------------------------------------------------------------------------------


@pytest.fixture
def server():
    state = {"healthy": True, "ready": False}
    srv = ObservabilityServer(
        0,
        health=lambda: Check(state["healthy"], "loops alive" if state["healthy"] else "heartbeat loop stuck"),
        ready=lambda: Check(state["ready"], "serving" if state["ready"] else "draining"),
        metrics=lambda: "edge_agent_jobs_running 1\n",
    ).start()
    try:
        yield srv, state
    finally:
        srv.stop()


def test_endpoints_answer_from_the_callbacks(server) -> None:
    srv, state = server
    base = f"http://127.0.0.1:{srv.port}"
    assert httpx.get(f"{base}/healthz").json() == {"ok": True, "reason": "loops alive"}
    reply = httpx.get(f"{base}/readyz")
    assert (reply.status_code, reply.json()["reason"]) == (503, "draining")
    state["ready"], state["healthy"] = True, False
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/healthz").status_code == 503
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metrics.text == "edge_agent_jobs_running 1\n"
    missing = httpx.get(f"{base}/nope")
    assert missing.status_code == 404 and "/healthz" in missing.json()["error"]
    assert httpx.post(f"{base}/healthz").status_code == 501


def test_a_raising_check_answers_500(server) -> None:
    srv, _ = server
    srv._health = lambda: (_ for _ in ()).throw(RuntimeError("broken"))
    reply = httpx.get(f"http://127.0.0.1:{srv.port}/healthz")
    assert reply.status_code == 500 and "broken" in reply.json()["error"]


def test_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = ObservabilityServer(port, health=lambda: Check(True, ""), ready=lambda: Check(True, ""),
                                  metrics=lambda: "")
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            srv.start()


def test_stop_closes_the_port(server) -> None:
    srv, _ = server
    port = srv.port
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
