"""The command line: one red line and the right exit code for each expected error, no tracebacks."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from edge_agent import __version__
from edge_agent.cli import app
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.protocol import RegistrationToken

runner = CliRunner()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token() -> str:
    return str(RegistrationToken.mint(b"\x01" * 32))


def assert_one_line_error(result, code: int, needle: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"edge-agent {__version__}"


def test_help_answers_the_basic_questions() -> None:
    out = runner.invoke(app, ["register", "--help"], terminal_width=200).stdout
    for needle in ("--url", "--token-file", "standard input", "process list", "--state-dir", "STATE_DIRECTORY"):
        assert needle in out, needle
    out = runner.invoke(app, ["run", "--help"], terminal_width=200).stdout
    assert "SIGTERM" in out and "--concurrency" in out and "--runtime-python" in out


def test_wrong_url_scheme(tmp_path: Path) -> None:
    result = runner.invoke(app, ["register", "--url", "http://gateway.example.com", "--token", token(),
                                 "--state-dir", str(tmp_path)])
    assert_one_line_error(result, 2, "must use https://")


def test_malformed_token(tmp_path: Path) -> None:
    result = runner.invoke(app, ["register", "--url", "https://127.0.0.1:1", "--token", "ghp_not_ours",
                                 "--state-dir", str(tmp_path)])
    assert_one_line_error(result, 2, "not an edge-agent registration token")
    assert "ghp_not_ours" not in result.output


def test_token_from_stdin_and_unreachable_gateway(tmp_path: Path) -> None:
    tok = token()
    result = runner.invoke(app, ["register", "--url", f"https://127.0.0.1:{closed_port()}", "--token-file", "-",
                                 "--state-dir", str(tmp_path)], input=tok + "\n")
    assert_one_line_error(result, 1, "cannot reach https://127.0.0.1:")
    assert tok.split("_")[2] not in result.output  # the secret is never echoed


def test_missing_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_TOKEN", raising=False)
    result = runner.invoke(app, ["register", "--url", "https://127.0.0.1:1", "--state-dir", str(tmp_path)])
    assert_one_line_error(result, 2, "no registration token")


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 2
    assert "--url" in result.output


@pytest.mark.parametrize("command", [["run"], ["status"], ["status", "--json"]])
def test_missing_state(tmp_path: Path, command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--state-dir", str(tmp_path / "empty")])
    assert_one_line_error(result, 2, f"no identity in {tmp_path / 'empty'}: run 'edge-agent register")


def test_run_with_bad_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path), "--runtime-python", "/nonexistent/python3"])
    assert_one_line_error(result, 2, "runtime python /nonexistent/python3 is not an executable file")


def stored_identity(url: str, *, expires: datetime) -> StoredIdentity:
    ca = trustme.CA()
    leaf = ca.issue_cert("agent.test")
    return StoredIdentity(
        agent_id="ag_7", name="edge-7", queues=("default",), region="eu-west", url=url, executor="x",
        cert_not_after=expires, cert_pem=leaf.cert_chain_pems[0].bytes().decode(),
        ca_pems=(ca.cert_pem.bytes().decode(),), key_pem=leaf.private_key_pem.bytes(),
    )


def test_status_with_unreachable_gateway(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{closed_port()}"
    Keystore(tmp_path, "file").save(stored_identity(url, expires=datetime.now(timezone.utc) + timedelta(hours=5)))
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--json", "--timeout", "5"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["identity"]["agent_id"] == "ag_7"
    assert report["gateway"]["reachable"] is False and "cannot reach" in report["gateway"]["error"]
    assert report["agent"] is None
    text = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--timeout", "5"], terminal_width=200).stdout
    assert "ag_7" in text and "not reachable" in text and "no status file" in text


def test_status_with_expired_certificate(tmp_path: Path) -> None:
    Keystore(tmp_path, "file").save(
        stored_identity("https://127.0.0.1:1", expires=datetime.now(timezone.utc) - timedelta(hours=1)))
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 1
    assert "EXPIRED" in result.stdout and "re-register" in result.stdout


def test_run_with_expired_certificate(tmp_path: Path) -> None:
    Keystore(tmp_path, "file").save(
        stored_identity("https://127.0.0.1:1", expires=datetime.now(timezone.utc) - timedelta(hours=1)))
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path)])
    assert_one_line_error(result, 1, "re-register with a new token")


def test_status_shows_what_a_running_agent_does(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{closed_port()}"
    Keystore(tmp_path, "file").save(stored_identity(url, expires=datetime.now(timezone.utc) + timedelta(hours=5)))
    import os

    (tmp_path / "status.json").write_text(json.dumps({
        "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00", "state": "draining",
        "free_slots": 1, "total_slots": 2, "updated_at": "2026-01-01T00:01:00+00:00",
        "last_heartbeat": {"ok": True, "at": "2026-01-01T00:01:00+00:00", "error": None},
        "activity": {"lease": "stopped: not asking for work", "heartbeat": "idle"},
        "jobs": [{"job_id": "j1", "dag_id": "etl", "task_id": "load", "run_id": "r1", "try_number": 2,
                  "phase": "running", "pid": 4242}],
    }))
    out = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--timeout", "5"], terminal_width=200).stdout
    assert f"pid {os.getpid()}" in out and "draining" in out
    assert "1 free of 2" in out and "stopped: not asking for work" in out
    assert "j1  etl.load  run r1  try 2  running  pid 4242" in out


def test_run_with_a_malformed_policy_names_file_and_key(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_dags = "finance_*"\n')
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path), "--policy", str(policy)])
    assert_one_line_error(result, 2, f"policy file {policy}: key 'allowed_dags' must be a list")
    (tmp_path / "policy.toml").write_text("allowed_dagz = []\n")  # the default path is read too
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path)])
    assert_one_line_error(result, 2, "unknown key 'allowed_dagz'")


def test_run_with_a_named_policy_that_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--state-dir", str(tmp_path)],
                           env={"EDGE_AGENT_POLICY": str(tmp_path / "missing.toml")})
    assert_one_line_error(result, 2, "missing.toml does not exist")


def test_status_says_how_to_recover_from_an_expired_certificate(tmp_path: Path) -> None:
    Keystore(tmp_path, "file").save(
        stored_identity("https://127.0.0.1:1", expires=datetime.now(timezone.utc) - timedelta(hours=1)))
    report = json.loads(runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--json"]).stdout)
    assert report["certificate_expired"] is True
    assert "certificate expired at" in report["gateway"]["error"]
    assert "edge-agent register --force" in report["gateway"]["error"]


def test_status_watch_redraws_until_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--watch redraws the view from the status file as it changes; Ctrl-C leaves with exit 0."""
    import os
    import time as time_mod

    url = f"https://127.0.0.1:{closed_port()}"
    Keystore(tmp_path, "file").save(stored_identity(url, expires=datetime.now(timezone.utc) + timedelta(hours=5)))
    status = {"pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00", "state": "running",
              "free_slots": 2, "total_slots": 2, "activity": {}, "jobs": [],
              "last_heartbeat": {"ok": True, "at": "2026-01-01T00:01:00+00:00", "error": None}}
    (tmp_path / "status.json").write_text(json.dumps(status))
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:  # the agent takes a job between two refreshes
            status.update(free_slots=1, jobs=[{"job_id": "j9", "dag_id": "etl", "task_id": "load", "run_id": "r",
                                               "try_number": 1, "phase": "running", "pid": 7}])
            (tmp_path / "status.json").write_text(json.dumps(status))
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(time_mod, "sleep", fake_sleep)
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--watch", "--interval", "1",
                                 "--timeout", "5"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert sleeps == [1.0, 1.0]
    # Off a terminal rich prints only the last frame: it must show the file as it was after the change.
    assert "1 free of 2" in result.stdout and "2 free of 2" not in result.stdout
    assert "j9  etl.load" in result.stdout and "Ctrl-C to leave" in result.stdout


def test_status_watch_and_json_do_not_mix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path), "--watch", "--json"])
    assert result.exit_code == 2 and "--watch" in result.output
