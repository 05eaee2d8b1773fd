"""The systemd unit (checked by systemd-analyze itself), its installation, first-start registration and
the local health verdict.

systemd-analyze (Debian's 'systemd' package) is needed; without it these tests skip on a developer
machine and fail under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.service import (
    FirstStart,
    first_start_token,
    health,
    install,
    render_env_file,
    render_unit,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_UNIT = ROOT / "packaging" / "systemd" / "edge-agent.service"
#: The exposure score `systemd-analyze security --offline=true` gives the shipped unit (docs/install.md).
#: Lower is better; a change to the sandbox that raises it must be deliberate.
MAX_EXPOSURE = 1.6


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("systemd-analyze missing: install Debian's 'systemd' package (CI=true)")
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    return path


def unit_for(tmp_path: Path, **kwargs) -> Path:
    binary = tmp_path / "bin" / "edge-agent"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(render_unit(binary, **kwargs))
    return unit


@pytest.mark.parametrize("kwargs", [
    {"user": "edge-agent"},
    {"user": None},  # DynamicUser=yes
    {"user": "edge-agent", "runtime_python": "/opt/rt/bin/python", "dags_folder": "/srv/dags", "concurrency": 8,
     "token_credential": "/etc/edge-agent/registration-token", "read_write_paths": ["/srv/data"],
     "memory_deny_write_execute": True},
    {"user": "edge-agent", "token_credential": "/etc/edge-agent/registration-token.cred", "encrypted_credential": True},
])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, kwargs: dict) -> None:
    tool = systemd_analyze()
    unit = unit_for(tmp_path, **kwargs)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "edge-agent.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_systemd_analyze_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    # The check above is only worth something if verify really looks at the unit.
    tool = systemd_analyze()
    unit = tmp_path / "edge-agent.service"
    unit.write_text(render_unit(tmp_path / "missing" / "edge-agent", "edge-agent"))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "is not executable" in result.stderr


def test_security_exposure_of_the_shipped_unit(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = tmp_path / "edge-agent.service"
    shutil.copy(SHIPPED_UNIT, unit)
    result = subprocess.run([tool, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, result.stdout
    assert f"**{match.group(1)} {match.group(2)}**" in (ROOT / "docs" / "install.md").read_text(), (
        f"docs/install.md must state the current score {match.group(1)} {match.group(2)}"
    )


def test_shipped_unit_is_the_rendered_one() -> None:
    # packaging/systemd/edge-agent.service goes into the .deb and install.sh; regenerate it with
    # render_unit('/opt/edge-agent/edge-agent', 'edge-agent') after changing render_unit.
    assert SHIPPED_UNIT.read_text() == render_unit("/opt/edge-agent/edge-agent", "edge-agent")


def test_unit_contents() -> None:
    text = render_unit("/opt/edge agent/edge-agent", "svc", runtime_python="/opt/rt/bin/python", concurrency=2)
    lines = text.splitlines()
    assert "Type=notify" in lines and "NotifyAccess=main" in lines and "WatchdogSec=60s" in lines
    assert "ExecStart='/opt/edge agent/edge-agent' run --runtime-python /opt/rt/bin/python --concurrency 2" in lines
    assert "User=svc" in lines and "Group=svc" in lines and "DynamicUser=yes" not in lines
    assert "StateDirectory=edge-agent" in lines and "ProtectSystem=strict" in lines
    assert "NoNewPrivileges=yes" in lines and "CapabilityBoundingSet=" in lines
    # Tasks need the network: nothing may cut it off.
    assert not any(line.startswith(("PrivateNetwork=yes", "IPAddressDeny=")) for line in lines)
    assert not any(line.startswith("LoadCredential") for line in lines)
    assert "MemoryDenyWriteExecute=yes" not in lines
    assert "DynamicUser=yes" in render_unit("/usr/bin/edge-agent").splitlines()


def test_unit_escapes_specifiers_and_refuses_relative_paths() -> None:
    assert "ExecStart=/opt/100%%/edge-agent run" in render_unit("/opt/100%/edge-agent").splitlines()
    with pytest.raises(ConfigError):
        render_unit("edge-agent")
    with pytest.raises(ConfigError):
        render_unit("/usr/bin/edge-agent", watchdog_seconds=1)


def test_env_file_quotes_and_comments() -> None:
    text = render_env_file(url="https://gw:8443", https_proxy="http://u:p w@proxy:3128")
    assert "EDGE_AGENT_URL=https://gw:8443" in text.splitlines()
    assert 'HTTPS_PROXY="http://u:p w@proxy:3128"' in text.splitlines()
    assert "#NO_PROXY=" in text.splitlines()
    with pytest.raises(ConfigError):
        render_env_file(url="a\nb")


def test_install_into_a_root_is_idempotent_and_keeps_operator_edits(tmp_path: Path) -> None:
    root = tmp_path / "root"
    token = tmp_path / "token"
    token.write_text("eat1_example\n")
    first = install("/opt/edge-agent/edge-agent", "edge-agent", root=root, token_file=token, url="https://gw:8443")
    assert first.unit == root / "etc/systemd/system/edge-agent.service"
    unit = first.unit.read_text()
    assert "LoadCredential=registration-token:/etc/edge-agent/registration-token" in unit
    assert stat.S_IMODE(first.token.stat().st_mode) == 0o600 and first.token.read_text() == "eat1_example\n"
    assert stat.S_IMODE(first.env_file.stat().st_mode) == 0o600
    assert "EDGE_AGENT_URL=https://gw:8443" in first.env_file.read_text()

    first.env_file.write_text(first.env_file.read_text() + "HTTPS_PROXY=http://proxy:3128\n")
    second = install("/opt/edge-agent/edge-agent", "edge-agent", root=root)
    assert second.env_file_kept and "HTTPS_PROXY=http://proxy:3128" in second.env_file.read_text()
    # The token stored by the first run is still handed over.
    assert "LoadCredential=registration-token:" in second.unit.read_text()
    assert second.unit.read_text() == unit


def test_install_refuses_an_empty_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        install("/usr/bin/edge-agent", root=tmp_path, token_text="  \n")


# -- first start --------------------------------------------------------------------------------------

def test_first_start_token_from_the_systemd_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "registration-token").write_text("eat1_secret_text\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "EDGE_AGENT_URL": "https://gw:8443"}
    fs = first_start_token(has_identity=False, env=env)
    assert fs == FirstStart(url="https://gw:8443", token="eat1_secret_text", source="credential registration-token")
    assert "eat1_secret_text" not in repr(fs)
    # Registered already: the (used-up) token is ignored from then on.
    assert first_start_token(has_identity=True, env=env) is None


def test_first_start_token_file_option_wins_and_url_option_wins(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "registration-token").write_text("from-credential")
    option = tmp_path / "tok"
    option.write_text("from-option")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "EDGE_AGENT_URL": "https://env:1"}
    fs = first_start_token(has_identity=False, url="https://opt:2", token_file=option, env=env)
    assert fs is not None and (fs.token, fs.url, fs.source) == ("from-option", "https://opt:2", "--token-file")
    env_file = {"EDGE_AGENT_TOKEN_FILE": str(option), "EDGE_AGENT_URL": "https://env:1"}
    assert first_start_token(has_identity=False, env=env_file).token == "from-option"  # type: ignore[union-attr]


def test_first_start_without_a_token_just_runs(tmp_path: Path) -> None:
    assert first_start_token(has_identity=False, env={}) is None
    # A credentials directory without our credential (other credentials only).
    assert first_start_token(has_identity=False, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_first_start_errors_are_config_errors(tmp_path: Path) -> None:
    token = tmp_path / "tok"
    token.write_text("eat1_x")
    with pytest.raises(ConfigError, match="EDGE_AGENT_URL"):
        first_start_token(has_identity=False, token_file=token, env={})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        first_start_token(has_identity=False, token_file=empty, env={"EDGE_AGENT_URL": "https://gw"})
    with pytest.raises(ConfigError, match="cannot read"):
        first_start_token(has_identity=False, token_file=tmp_path / "nope", env={"EDGE_AGENT_URL": "https://gw"})


# -- health -------------------------------------------------------------------------------------------

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def status(**fields) -> dict:
    base = {"alive": True, "pid": 42, "state": "running", "started_at": ago(600),
            "last_heartbeat": {"ok": True, "at": ago(5), "error": None}}
    base.update(fields)
    return base


@pytest.mark.parametrize("st, ok, words", [
    (None, False, "no status file"),
    (status(alive=False), False, "not running"),
    (status(), True, "heartbeat ok"),
    (status(state="draining"), True, "draining"),
    # The gateway being down is not a reason to restart the agent (and kill its tasks).
    (status(last_heartbeat={"ok": False, "at": ago(5), "error": "connection refused"}), True, "unreachable"),
    (status(last_heartbeat={"ok": True, "at": ago(600), "error": None}), False, "stuck"),
    (status(state="failed", last_error="identity revoked"), False, "identity revoked"),
    (status(state="stopped"), False, "stopped"),
    (status(state="starting", started_at=ago(30), last_heartbeat=None), True, "starting"),
    (status(state="starting", started_at=ago(3600), last_heartbeat=None), False, "without a heartbeat"),
    (status(state="running", started_at=ago(30), last_heartbeat=None), True, "starting"),
])
def test_health(st, ok, words) -> None:
    verdict = health(st, now=NOW)
    assert verdict.ok is ok and words in verdict.reason, verdict


def test_cli_service_install_into_a_root(tmp_path):
    """'edge-agent service install' writes a unit systemd accepts, and the token 0600."""
    import shutil
    import stat
    import subprocess

    from typer.testing import CliRunner

    from edge_agent.cli import app

    token = tmp_path / "token"
    token.write_text("eat1_x\n")
    root = tmp_path / "root"
    binary = tmp_path / "edge-agent"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    result = CliRunner().invoke(
        app, ["service", "install", "--root", str(root), "--url", "https://gw.example:8443",
              "--token-file", str(token), "--binary", str(binary)],
    )
    assert result.exit_code == 0, result.output
    unit = root / "etc/systemd/system/edge-agent.service"
    assert "Type=notify" in unit.read_text() and str(binary) in unit.read_text()
    written = root / "etc/edge-agent/registration-token"
    assert written.read_text().strip() == "eat1_x" and stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "https://gw.example:8443" in (root / "etc/edge-agent/edge-agent.env").read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze:
        check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
