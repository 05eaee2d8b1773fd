"""The status file's gateway/spool view of an outage, and how `edge-agent status` shows it."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import trustme
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.observability.status import StatusBoard, outage_seconds, read_status
from edge_agent.spool import Spool
from test_spool import entry

runner = CliRunner()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_identity(state_dir: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("agent.test")
    Keystore(state_dir, "file").save(StoredIdentity(
        agent_id="ag_1", name="edge-1", queues=("default",), region="eu",
        url=f"https://127.0.0.1:{closed_port()}", executor="x",
        cert_not_after=datetime.now(timezone.utc) + timedelta(hours=5),
        cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(ca.cert_pem.bytes().decode(),),
        key_pem=leaf.private_key_pem.bytes(),
    ))


def test_since_marks_the_start_of_an_outage_and_of_the_streak_after_it(tmp_path: Path, caplog) -> None:
    board = StatusBoard(tmp_path / "status.json")
    assert board.snapshot()["gateway"] == {"reachable": None, "since": None, "last_error": None}
    assert board.snapshot()["spool"] == {"jobs": 0, "bytes": 0}
    with caplog.at_level(logging.INFO, logger="edge_agent.observability.status"):
        board.gateway(True)
        up = board.snapshot()["gateway"]
        assert up["reachable"] is True and up["since"] and up["last_error"] is None
        board.heartbeat(False, "cannot reach https://gw: refused")
        down = board.snapshot()["gateway"]
        assert down == {"reachable": False, "since": down["since"], "last_error": "cannot reach https://gw: refused"}
        board.gateway(False, "lease request timed out")  # the outage goes on: since stays
        assert board.snapshot()["gateway"]["since"] == down["since"]
        assert board.snapshot()["gateway"]["last_error"] == "lease request timed out"
        board.gateway(False)  # a failure without a message keeps the last one
        assert board.snapshot()["gateway"]["last_error"] == "lease request timed out"
        board.heartbeat(True)
    back = read_status(tmp_path / "status.json")
    assert back is not None and back["gateway"]["reachable"] is True and back["gateway"]["last_error"] is None
    assert back["gateway_reachable"] is True  # the old field, for older readers
    assert back["last_error"] == "lease request timed out"
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("gateway unreachable") for m in messages) == 1
    assert sum(m.startswith("gateway reachable again after an outage of") for m in messages) == 1


def test_outage_seconds() -> None:
    now = datetime(2026, 1, 1, 0, 10, tzinfo=timezone.utc)
    assert outage_seconds({"since": "2026-01-01T00:00:00+00:00"}, now) == 600
    assert outage_seconds({"since": None}, now) is None
    assert outage_seconds({"since": "yesterday"}, now) is None
    assert outage_seconds(None, now) is None


def running_status(tmp_path: Path, **extra: object) -> None:
    since = (datetime.now(timezone.utc) - timedelta(seconds=125)).isoformat(timespec="seconds")
    (tmp_path / "status.json").write_text(json.dumps({
        "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00", "state": "running",
        "free_slots": 1, "total_slots": 2, "updated_at": since,
        "last_heartbeat": {"ok": False, "at": since, "error": "cannot reach https://gw: refused"},
        "activity": {}, "jobs": [
            {"job_id": "j1", "dag_id": "etl", "task_id": "load", "run_id": "r1", "try_number": 1,
             "phase": "running", "pid": 4242},
            {"job_id": "j0", "dag_id": "etl", "task_id": "extract", "run_id": "r1", "try_number": 1,
             "phase": "spooled", "pid": None},
        ],
        "gateway": {"reachable": False, "since": since, "last_error": "cannot reach https://gw: refused"},
        "spool": {"jobs": 2, "bytes": 1234},
        **extra,
    }))


def test_status_text_shows_the_outage_line(tmp_path: Path) -> None:
    save_identity(tmp_path)
    running_status(tmp_path)
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--timeout", "5"], terminal_width=300)
    assert result.exit_code == 1  # the gateway does not answer this probe either
    line = next(x for x in result.stdout.splitlines() if "gateway unreachable since" in x)
    since = json.loads((tmp_path / "status.json").read_text())["gateway"]["since"]
    assert line.strip().startswith(f"gateway unreachable since {since} (")
    seconds = int(line.split("(")[1].split(" s)")[0])
    assert seconds >= 125
    assert line.endswith("s): cannot reach https://gw: refused; 2 job report(s) spooled")
    assert "1 held, 1 from the spool being delivered" in result.stdout


def test_status_json_carries_the_gateway_and_spool_objects(tmp_path: Path) -> None:
    save_identity(tmp_path)
    running_status(tmp_path)
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry("j0"), 1)
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--json", "--timeout", "5"])
    report = json.loads(result.stdout)
    assert report["agent"]["gateway"]["reachable"] is False and report["agent"]["gateway"]["since"]
    assert report["agent"]["spool"] == {"jobs": 2, "bytes": 1234}  # the running agent's view
    assert report["spool"]["jobs"] == 1  # what is on disk now


def test_status_of_a_stopped_agent_names_what_the_next_start_replays(tmp_path: Path) -> None:
    save_identity(tmp_path)
    running_status(tmp_path, pid=2 ** 22 + 12345)  # no such process
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry("j0"), 1)
    out = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--timeout", "5"], terminal_width=300).stdout
    assert "not running" in out
    assert "1 job(s) with reports to deliver" in out and "replayed by the next 'edge-agent run'" in out
    assert "gateway unreachable since" not in out  # a dead agent's outage view is stale


def test_run_help_shows_the_grace_options() -> None:
    out = runner.invoke(app, ["run", "--help"], terminal_width=200).stdout
    for needle in ("--drain-grace", "--cancel-grace", "EDGE_AGENT_DRAIN_GRACE", "EDGE_AGENT_CANCEL_GRACE",
                   "540", "TimeoutStopSec", "spool"):
        assert needle in out, needle


def test_run_refuses_a_bad_grace_with_one_clear_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path), "--drain-grace", "-5"])
    assert result.exit_code == 2 and "drain grace must be between 0 and 604800 seconds, got -5.0" in result.stderr
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path)], env={"EDGE_AGENT_CANCEL_GRACE": "soon"})
    assert result.exit_code == 2
    assert "cancel grace must be a number of seconds, got 'soon' (from $EDGE_AGENT_CANCEL_GRACE)" in result.stderr
    assert "Traceback" not in result.output
