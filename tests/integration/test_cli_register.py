"""The real ``edge-agent`` command against a real gateway: registration, its refusals, and status.

Each refusal must be one line on stderr, a non-zero exit, and no identity written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from edge_agent.protocol import RegistrationToken

EDGE_AGENT = shutil.which("edge-agent", path=str(Path(sys.executable).parent))


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EDGE_AGENT"))}
    env["EDGE_AGENT_SECRET_BACKEND"] = "file"
    return subprocess.run(
        [EDGE_AGENT, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def no_identity(state: Path) -> bool:
    return not (state / "agent.key").exists() and not (state / "identity.json").exists()


def test_register_then_status(gateway, tmp_path):
    token = gateway.mint_token(queues=["q-cli"], name="cli-agent")
    state = tmp_path / "state"
    # The token comes on stdin, so it never appears in the process list.
    result = run_cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(state), stdin=str(token))
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "q-cli" in out and "it-1" in out and "ag_" in out
    assert token.secret not in out
    assert stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    status = run_cli("status", "--state-dir", str(state), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert json.dumps(doc).count("q-cli") >= 1
    assert "ag_" in json.dumps(doc)


def test_used_token_is_refused_for_another_key(gateway, tmp_path):
    token = gateway.mint_token(queues=["q-cli"])
    token_file = tmp_path / "token"
    token_file.write_text(str(token))
    token_file.chmod(0o600)
    first = run_cli("register", "--url", gateway.url, "--token-file", str(token_file), "--state-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    second = run_cli("register", "--url", gateway.url, "--token-file", str(token_file), "--state-dir", str(tmp_path / "b"))
    assert "already used" in one_line_error(second)
    assert no_identity(tmp_path / "b")


def test_expired_token_is_refused(gateway, tmp_path):
    token = gateway.mint_token(queues=["q-cli"], ttl=timedelta(seconds=-1))
    result = run_cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"), stdin=str(token))
    assert "expired" in one_line_error(result)
    assert no_identity(tmp_path / "s")


def test_pin_mismatch_aborts(gateway, tmp_path):
    foreign = RegistrationToken(token_id="abcdefgh", secret="a" * 26, ca_pin=bytes(32))
    result = run_cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"), stdin=str(foreign))
    assert "pin" in one_line_error(result).lower()
    assert no_identity(tmp_path / "s")


def test_unreachable_gateway(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the CLI connects: nothing listens there
    token = RegistrationToken.mint(bytes(32))
    result = run_cli(
        "register", "--url", f"https://127.0.0.1:{port}", "--token-file", "-", "--state-dir", str(tmp_path / "s"),
        stdin=str(token),
    )
    line = one_line_error(result)
    assert str(port) in line or "reach" in line.lower() or "connect" in line.lower()


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "127.0.0.1:1", "https://"])
def test_wrong_url(url, tmp_path):
    token = RegistrationToken.mint(bytes(32))
    result = run_cli("register", "--url", url, "--token-file", "-", "--state-dir", str(tmp_path / "s"), stdin=str(token))
    one_line_error(result)
    assert result.returncode == 2


def test_run_without_identity(tmp_path):
    result = run_cli("run", "--state-dir", str(tmp_path / "empty"))
    assert "register" in one_line_error(result)


def test_first_start_registers_from_a_token_file_then_runs(gateway, tmp_path):
    """What a systemd service or a container does: 'run' with a token and no identity yet."""
    import signal
    import time

    token = gateway.mint_token(queues=["q-first-start"])
    token_file = tmp_path / "registration-token"
    token_file.write_text(str(token))
    token_file.chmod(0o600)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EDGE_AGENT"))}
    env["EDGE_AGENT_SECRET_BACKEND"] = "file"
    proc = subprocess.Popen(
        [EDGE_AGENT, "run", "--state-dir", str(state), "--url", gateway.url, "--token-file", str(token_file),
         "--concurrency", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 180
        healthy = None
        while time.monotonic() < deadline and proc.poll() is None:
            healthy = run_cli("health", "--state-dir", str(state))
            if healthy.returncode == 0:
                break
            time.sleep(1)
        assert healthy is not None and healthy.returncode == 0, (healthy and healthy.stdout, proc.poll())
        assert stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600
        doctor = run_cli("doctor", "--state-dir", str(state), "--json")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
        assert checks["ca_pin"] == "ok" and checks["identity"] == "ok", checks
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    # The token was used once: a second start must not try to register again.
    assert run_cli("health", "--state-dir", str(state)).returncode == 1  # stopped now


def test_doctor_before_registration_checks_the_pin(gateway, tmp_path):
    token = gateway.mint_token(queues=["q-cli"])
    ok = run_cli("doctor", "--url", gateway.url, "--token-file", "-", stdin=str(token))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    foreign = RegistrationToken(token_id="abcdefgh", secret="a" * 26, ca_pin=bytes(32))
    bad = run_cli("doctor", "--url", gateway.url, "--token-file", "-", stdin=str(foreign))
    assert bad.returncode == 1
    assert "ca_pin" in bad.stdout and "fix:" in bad.stdout


def test_health_without_a_running_agent(tmp_path):
    result = run_cli("health", "--state-dir", str(tmp_path))
    assert result.returncode == 1 and "no status file" in result.stdout
