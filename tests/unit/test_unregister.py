"""edge-agent unregister: server told first, then local secrets wiped; audit log kept; never under a running agent."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from fake_tls_gateway import FakeTLSGateway
from typer.testing import CliRunner

from edge_agent import statelock
from edge_agent.audit import verify
from edge_agent.cli import app
from edge_agent.errors import ServerNotTold, StateDirBusy, StateMissing
from edge_agent.identity.keystore import Keystore, StoredIdentity
from edge_agent.identity.unregister import unregister

runner = CliRunner()
SECRETS = {"identity.json", "agent.key", "agent.pem", "ca.pem"}


@pytest.fixture()
def gw(tmp_path: Path) -> Iterator[FakeTLSGateway]:
    gateway = FakeTLSGateway(tmp_path / "gw")
    yield gateway
    gateway.stop()


def registered(gw: FakeTLSGateway, state: Path, **changes) -> StoredIdentity:
    identity, _ = gw.enroll()
    identity = StoredIdentity(**{**identity.__dict__, **changes})
    Keystore(state, "file").save(identity)
    return identity


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def names(state: Path) -> set[str]:
    return {p.name for p in state.iterdir()}


def test_unregister_tells_the_server_then_wipes_and_keeps_the_audit_log(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state)
    result = runner.invoke(app, ["unregister", "--state-dir", str(state), "--yes"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Unregistered agent ag_1" in result.stdout and "removed" in result.stdout
    assert [(c.method, c.path) for c in gw.calls] == [("DELETE", "/agents/v1/self")]
    assert gw.calls[0].serial is not None  # under the agent's certificate
    assert not names(state) & SECRETS
    entries = [json.loads(x) for x in (state / "audit.log").read_text().splitlines()]
    assert entries[-1]["event"] == "unregistered" and entries[-1]["server"] == "removed"
    assert verify(state).ok
    with pytest.raises(StateMissing):
        Keystore(state).load()


def test_already_revoked_on_the_server_still_wipes(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state)
    gw.status_for["/agents/v1/self"] = 403
    result = unregister(state, timeout=10)
    assert result.server == "already removed or revoked"
    assert not names(state) & SECRETS


def test_unreachable_gateway_wipes_nothing_unless_local_only(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state, url=f"https://127.0.0.1:{closed_port()}")
    result = runner.invoke(app, ["unregister", "--state-dir", str(state), "--yes", "--timeout", "5"])
    assert result.exit_code == 1
    assert "could not unregister" in result.stderr and "nothing was wiped" in result.stderr
    assert "--local-only" in result.stderr
    assert SECRETS <= names(state)
    result = runner.invoke(app, ["unregister", "--state-dir", str(state), "--yes", "--local-only"])
    assert result.exit_code == 0, result.output
    assert not names(state) & SECRETS


def test_expired_certificate_cannot_tell_the_server(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state, cert_not_after=datetime.now(timezone.utc) - timedelta(minutes=1))
    with pytest.raises(ServerNotTold, match="expired .* --local-only"):
        unregister(state, timeout=5)
    assert SECRETS <= names(state) and gw.calls == []


def test_refused_while_the_agent_runs(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state)
    with statelock.held(state):
        with pytest.raises(StateDirBusy, match="already uses"):
            unregister(state, timeout=5)
        result = runner.invoke(app, ["unregister", "--state-dir", str(state), "--yes"])
        assert result.exit_code == 2 and "stop it first" in result.stderr
    assert SECRETS <= names(state) and gw.calls == []


def test_asks_before_wiping(gw, tmp_path: Path) -> None:
    state = tmp_path / "state"
    registered(gw, state)
    result = runner.invoke(app, ["unregister", "--state-dir", str(state)], input="n\n")
    assert result.exit_code == 1 and SECRETS <= names(state) and gw.calls == []


def test_nothing_to_unregister(tmp_path: Path) -> None:
    result = runner.invoke(app, ["unregister", "--state-dir", str(tmp_path), "--yes"])
    assert result.exit_code == 2 and "no identity in" in result.stderr
