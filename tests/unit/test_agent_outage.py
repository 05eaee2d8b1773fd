"""Gateway outages, the spool and drains, with the real agent against a fake gateway and a fake runtime.

Same harness as ``test_agent.py`` (real agent, loops, AgentAPI, status file, forwarder; the gateway
faked at the HTTP transport, the runtime at its start/submit/cancel/stop + callbacks contract). The
gateway here can go down: every request then fails at connect, as with a stopped gateway process.
The state directory, spool and audit log are real files; a "restart" is a second Agent on the
same state directory.
"""

# ruff: noqa: F811  (the harness fixtures are imported from test_agent)
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import httpx

from edge_agent import protocol as p
from edge_agent.runtime import EXIT_RUNTIME_LOST
from edge_agent.spool import CORRUPT_SUFFIX, SPOOL_DIR, Spool, SpoolEntry
from test_agent import WAIT, FakeGateway, Harness, harness, identity  # noqa: F401  (fixtures)


class OutageGateway(FakeGateway):
    """A FakeGateway that can be "stopped": requests are recorded (waking waiters) then refused at connect."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused_calls = 0

    def go_down(self) -> None:
        with self.cond:
            self.down = True
            self.cond.notify_all()  # a held lease poll ends (with an empty answer)

    def come_back(self) -> None:
        with self.cond:
            self.down = False
            self.cond.notify_all()

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.cond:
            if self.down:
                self.refused_calls += 1
                self.cond.notify_all()
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.path == p.LEASE_PATH:
            return self._lease(request)
        return super().handle(request)

    def _lease(self, request: httpx.Request) -> httpx.Response:
        # The parent's long-poll, but it also ends when the gateway goes down.
        body = json.loads(request.content)
        with self.cond:
            self.calls.append((request.method, request.url.path, body))
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.leases or self.closed or self.down, timeout=body["wait_seconds"])
            if self.down:
                raise httpx.ReadError("connection reset by peer", request=request)
            lease = self.leases.pop(0) if self.leases and not self.closed else None
        return httpx.Response(200, json={"lease": lease.model_dump(mode="json") if lease else None})


def index(gw: FakeGateway, path: str, *, last: bool = False) -> int:
    """Position of the first (or last) call to ``path`` among all calls the gateway received."""
    with gw.cond:
        hits = [i for i, (_, pth, _) in enumerate(gw.calls) if pth == path]
    assert hits, f"no call to {path}"
    return hits[-1] if last else hits[0]


def outage_harness(make: Callable[..., Harness], **kwargs: Any) -> Harness:
    h = make(**kwargs)
    h.gw = OutageGateway()  # the API factory reads h.gw when the agent starts
    return h


def spool_records(state_dir: Path) -> dict[str, dict]:
    folder = state_dir / SPOOL_DIR
    if not folder.exists():
        return {}
    records = {}
    for f in folder.iterdir():
        if f.name.endswith(".json"):
            try:
                records[f.name] = json.loads(f.read_text())
            except FileNotFoundError:
                continue  # the running agent deleted it between the listing and the read
    return records


def spooled(state_dir: Path, job_id: str) -> dict | None:
    return spool_records(state_dir).get(f"{job_id}.json")


def seed(state_dir: Path, job_id: str, log_text: str | None = None, **fields: Any) -> SpoolEntry:
    """A record as an earlier agent process would have left it."""
    log_file = None
    if log_text is not None:
        log_file = state_dir / "logs" / f"dag_id=etl/{job_id}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(log_text)
    values: dict[str, Any] = dict(
        job_id=job_id, fencing=5, agent_id="ag_1", queue="default", dag_id="etl", task_id=f"t_{job_id}",
        run_id="r1", map_index=-1, try_number=1, bundle="dags-folder", log_policy="hosted",
        leased_at="2026-01-01T00:00:00+00:00", spooled_at="2026-01-01T00:00:01+00:00",
        started_at="2026-01-01T00:00:01+00:00", pid=999999, running_reported=False,
        log_file=str(log_file) if log_file else None,
    )
    values.update(fields)
    e = SpoolEntry(**values)
    spool = Spool(state_dir)
    spool.open()
    assert spool.save(e, 1)
    return e


def test_an_outage_spools_the_reports_and_they_arrive_in_order_when_the_gateway_returns(harness) -> None:
    h = outage_harness(harness).start()
    sd = h.config.state_dir
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1") and h.gw.logs.get("j1"), "RUNNING and the first chunk")
    h.gw.wait_for(lambda: (spooled(sd, "j1") or {}).get("running_reported"), "RUNNING acknowledged in the spool")

    h.gw.go_down()
    h.rt.write("j1", '{"event": "written during the outage"}\n{"event": "no newline at the end"}')
    h.gw.wait_for(lambda: h.status()["gateway"]["reachable"] is False, "the status file shows the outage")
    h.rt.finish("j1", 0)
    h.gw.wait_for(lambda: (spooled(sd, "j1") or {}).get("exited"), "the final state in the spool")
    record = spooled(sd, "j1")
    assert record is not None and record["exit_code"] == 0 and record["fencing"] == 1
    assert record["log_offset"] == len('{"event": "starting j1"}\n')  # only what the gateway acknowledged
    assert h.rt.cancels == []  # nothing cancels a task because the gateway is away
    st = h.status()
    # The last failed call's error: a refused connect, or the held lease poll cut off.
    assert st["gateway"]["since"] and "https://gw.test" in st["gateway"]["last_error"]
    assert st["spool"]["jobs"] == 1 and st["spool"]["bytes"] > 0
    assert st["free_slots"] == 1  # the job holds its slot until its final report is delivered

    before = len(h.gw.calls)
    h.gw.come_back()
    h.gw.wait_for(lambda: len(h.gw.states("j1")) == 2, "the final report")
    h.gw.wait_for(lambda: not spool_records(sd), "the spool record deleted after delivery")
    after = [(path, body) for _, path, body in h.gw.calls[before:] if "/jobs/j1/" in path]
    assert [path for path, _ in after][-1] == p.job_state_path("j1")  # the final state after every chunk
    assert after[-1][1]["state"] == "success"
    assert bytes(h.gw.logs["j1"]) == (h.config.log_folder / "dag_id=dag/j1.log").read_bytes()
    h.gw.wait_for(lambda: h.status()["gateway"]["reachable"] is True and h.status()["spool"]["jobs"] == 0,
                  "status back to normal")
    assert h.status()["gateway"]["last_error"] is None
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_a_drain_during_an_outage_exits_and_the_next_start_replays_before_leasing(harness) -> None:
    h = outage_harness(harness).start()
    sd = h.config.state_dir
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING")
    h.gw.go_down()
    h.agent.stop_gracefully("SIGTERM received")
    h.rt.write("j1", '{"event": "last words"}\n')
    h.rt.finish("j1", 1, "the task failed")
    assert h.join() == {"code": 0}  # the drain ends although the reports could not be delivered
    record = spooled(sd, "j1")
    assert record is not None and record["exited"] and record["exit_code"] == 1
    assert h.status()["state"] == "stopped" and h.status()["spool"]["jobs"] == 1

    again = outage_harness(harness)
    again.gw.queue("j2")  # waiting work must not be leased before the spool is replayed
    again.start()
    again.gw.wait_for(lambda: again.gw.states("j1"), "the replayed final report")
    again.gw.wait_for(lambda: again.gw.states("j2"), "new work after the replay")
    gw = again.gw
    assert [s["state"] for s in gw.states("j1")] == ["failed"]  # RUNNING was delivered before the outage
    assert gw.states("j1")[0]["reason"] == "the task failed" and gw.states("j1")[0]["fencing"] == 1
    assert index(gw, p.job_state_path("j1")) < index(gw, p.LEASE_PATH)
    assert index(gw, p.job_logs_path("j1"), last=True) < index(gw, p.job_state_path("j1"))
    local = (h.config.log_folder / "dag_id=dag/j1.log").read_bytes()
    # This fake gateway starts with no copy: the agent resends from where its copy ends (LogGap).
    hosted = bytes(gw.logs["j1"])
    assert hosted.startswith(local) and b"the task failed" in hosted[len(local):]  # + the reason line
    first_lease = next(body for _, path, body in gw.calls if path == p.LEASE_PATH)
    assert first_lease["free_slots"] == 2
    again.rt.finish("j2", 0)
    again.gw.wait_for(lambda: len(gw.states("j2")) == 2, "j2 reported")
    again.agent.stop_gracefully("test")
    assert again.join() == {"code": 0}
    assert spool_records(sd) == {}


def test_replay_order_per_job_running_then_log_from_the_cursor_then_final(harness) -> None:
    h = harness()
    sd = h.config.state_dir
    already = '{"event": "shipped before the restart"}\n'
    seed(sd, "a", already + '{"event": "after the cursor"}\n', exited=True, exit_code=0, log_offset=len(already),
         spooled_at="2026-01-01T00:00:02+00:00")
    seed(sd, "b", None, exited=True, exit_code=78, reason="DAG file missing on this agent",
         spooled_at="2026-01-01T00:00:01+00:00", started_at=None)
    with h.gw.cond:
        h.gw.logs["a"] = bytearray(already.encode())  # what the gateway had before the restart
    h.start()
    h.gw.wait_for(lambda: len(h.gw.states("a")) == 2 and h.gw.states("b"), "replayed reports")
    paths = [path for _, path, _ in h.gw.calls if "/jobs/" in path]
    # b was spooled first; never started: no RUNNING, the reason line in its log, then FAILED.
    assert paths == [p.job_logs_path("b"), p.job_state_path("b"),
                     p.job_state_path("a"), p.job_logs_path("a"), p.job_state_path("a")]
    assert [s["state"] for s in h.gw.states("a")] == ["running", "success"]
    assert h.gw.states("b") == [{"fencing": 5, "state": "failed", "exit_code": 78,
                                 "reason": "DAG file missing on this agent"}]
    assert bytes(h.gw.logs["a"]).decode() == already + '{"event": "after the cursor"}\n'
    assert "DAG file missing" in bytes(h.gw.logs["b"]).decode()
    h.gw.wait_for(lambda: not spool_records(sd), "spool emptied")
    # The lease loop asks only after the replay; on a loaded machine its first call may come later.
    h.gw.wait_for(lambda: p.LEASE_PATH in h.gw.paths(), "a lease request after the replay")
    assert index(h.gw, p.job_state_path("a"), last=True) < index(h.gw, p.LEASE_PATH)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_replayed_jobs_hold_no_slot_and_a_failing_replay_does_not_block_new_work(harness) -> None:
    h = harness(concurrency=1)
    seed(h.config.state_dir, "old", '{"event": "x"}\n', exited=True, exit_code=0)
    h.gw.status_for[p.job_state_path("old")] = 503
    h.gw.queue("new")
    h.start()
    h.gw.wait_for(lambda: h.gw.states("new"), "new work runs while the replay keeps failing")
    assert index(h.gw, p.job_state_path("old")) < index(h.gw, p.LEASE_PATH)  # tried before leasing
    assert next(body for _, path, body in h.gw.calls if path == p.LEASE_PATH)["free_slots"] == 1
    phases = {j["job_id"]: j["phase"] for j in h.status()["jobs"]}
    assert phases == {"old": "spooled", "new": "running"}
    hb = [body for _, path, body in h.gw.calls if path == p.HEARTBEAT_PATH][-1]
    assert [r["job_id"] for r in hb["running"]] == ["new"]  # no lease renewal for a replayed job
    with h.gw.cond:
        del h.gw.status_for[p.job_state_path("old")]
    h.gw.wait_for(lambda: h.gw.count(p.job_state_path("old")) >= 3, "the replay delivered after backoff")
    h.gw.wait_for(lambda: "old.json" not in spool_records(h.config.state_dir), "its record deleted")
    h.rt.finish("new", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_a_replayed_job_the_gateway_disowns_is_dropped(harness) -> None:
    h = harness()
    seed(h.config.state_dir, "gone", '{"event": "x"}\n', exited=True, exit_code=0)
    h.gw.status_for[p.job_state_path("gone")] = 409
    h.start()
    h.gw.wait_for(lambda: h.gw.states("gone"), "the RUNNING attempt")
    h.gw.wait_for(lambda: not spool_records(h.config.state_dir), "record deleted")
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= 3, "a few more beats")
    assert h.gw.count(p.job_state_path("gone")) == 1 and h.gw.count(p.job_logs_path("gone")) == 0
    assert h.status()["jobs"] == []
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_a_job_whose_agent_died_mid_task_is_reported_failed_from_the_spool(harness) -> None:
    from edge_agent.audit import verify

    h = harness()
    seed(h.config.state_dir, "crashed", '{"event": "working"}\n', running_reported=True)
    h.start()
    h.gw.wait_for(lambda: h.gw.states("crashed"), "the replayed report")
    (report,) = h.gw.states("crashed")
    assert report["state"] == "failed" and report["exit_code"] == EXIT_RUNTIME_LOST
    assert "stopped before the job ended" in report["reason"]
    assert "stopped before the job ended" in bytes(h.gw.logs["crashed"]).decode()  # the user sees why
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
    entries = [json.loads(line) for line in (h.config.state_dir / "audit.log").read_text().splitlines()]
    (finish,) = [e for e in entries if e["event"] == "finish"]
    assert finish["job_id"] == "crashed" and finish["replayed"] is True and finish["exit_code"] == EXIT_RUNTIME_LOST
    assert verify(h.config.state_dir).ok


def test_a_corrupt_spool_record_is_set_aside_and_the_agent_runs(harness, caplog) -> None:
    h = harness()
    folder = h.config.state_dir / SPOOL_DIR
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text('{"v": 1, "job_id": ')
    with caplog.at_level(logging.ERROR):
        h.start()
        h.gw.queue("j1")
        h.gw.wait_for(lambda: h.gw.states("j1"), "work goes on")
    assert (folder / ("broken.json" + CORRUPT_SUFFIX)).exists()
    assert any("broken.json" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    h.rt.finish("j1", 0)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}


def test_drain_past_its_grace_cancels_and_reports_the_reason(harness) -> None:
    h = harness(drain_grace=0.2).start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING")
    h.agent.stop_gracefully("SIGTERM received")
    assert h.join() == {"code": 0}
    assert h.rt.cancels == [("j1", "drain grace of 0.2 s expired")]
    final = h.gw.states("j1")[-1]
    assert final["state"] == "failed" and "drain grace of 0.2 s expired" in final["reason"]


def test_a_drain_that_ends_in_time_cancels_nothing(harness) -> None:
    h = harness(drain_grace=WAIT).start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING")
    h.agent.stop_gracefully("SIGTERM received")
    h.gw.wait_for(lambda: "waiting up to" in h.status()["activity"]["agent"], "draining")
    h.rt.finish("j1", 0)
    assert h.join() == {"code": 0}
    assert h.rt.cancels == [] and h.gw.states("j1")[-1]["state"] == "success"


def test_a_cancel_during_an_outage_spools_the_failure_and_the_next_start_delivers_it(harness) -> None:
    h = outage_harness(harness).start()
    h.gw.queue("j1")
    h.gw.wait_for(lambda: h.gw.states("j1"), "RUNNING")
    h.gw.go_down()
    h.agent.stop_gracefully("SIGTERM")
    h.agent.stop_now("SIGTERM twice")
    assert h.join() == {"code": 0}
    record = spooled(h.config.state_dir, "j1")
    assert record is not None and record["exit_code"] == 143
    assert record["reason"] == "cancelled: agent stopping now (second stop request)"

    again = harness().start()
    again.gw.wait_for(lambda: again.gw.states("j1"), "the replayed failure")
    assert again.gw.states("j1") == [{"fencing": 1, "state": "failed", "exit_code": 143,
                                      "reason": "cancelled: agent stopping now (second stop request)"}]
    again.agent.stop_gracefully("test")
    assert again.join() == {"code": 0}


def test_heartbeats_keep_their_cadence_in_an_outage_and_warn_once(harness, caplog) -> None:
    h = outage_harness(harness).start()
    h.gw.wait_for(lambda: h.gw.count(p.HEARTBEAT_PATH) >= 1, "first beat")
    with caplog.at_level(logging.DEBUG):
        h.gw.go_down()
        h.gw.wait_for(lambda: h.gw.refused_calls >= 8, "several refused calls")
        h.gw.come_back()
        h.gw.wait_for(lambda: h.status()["gateway"]["reachable"] is True, "back")
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name == "edge_agent.heartbeat"]
    assert len(warnings) == 1 and "running tasks go on" in warnings[0]
    outage_lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.observability.status"]
    assert any(m.startswith("gateway unreachable") for m in outage_lines)
    assert any(m.startswith("gateway reachable again after an outage of") for m in outage_lines)
    h.agent.stop_gracefully("test")
    assert h.join() == {"code": 0}
