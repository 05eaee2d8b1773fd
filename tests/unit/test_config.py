"""AgentConfig: option > env > default precedence, validation, token sources."""

from __future__ import annotations

import io
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, read_token, resolve_state_dir
from edge_agent.errors import ConfigError


def test_state_dir_precedence(tmp_path: Path) -> None:
    env = {
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "a"),
        "STATE_DIRECTORY": f"{tmp_path / 'b'}:{tmp_path / 'b2'}",
        "XDG_STATE_HOME": str(tmp_path / "c"),
        "HOME": str(tmp_path / "home"),
    }
    assert resolve_state_dir(tmp_path / "opt", env) == tmp_path / "opt"
    assert resolve_state_dir(None, env) == tmp_path / "a"
    del env["EDGE_AGENT_STATE_DIR"]
    assert resolve_state_dir(None, env) == tmp_path / "b"  # first of systemd's list
    del env["STATE_DIRECTORY"]
    assert resolve_state_dir(None, env) == tmp_path / "c" / "edge-agent"
    del env["XDG_STATE_HOME"]
    assert resolve_state_dir(None, env) == tmp_path / "home" / ".local" / "state" / "edge-agent"


def test_defaults_follow_the_state_dir(tmp_path: Path) -> None:
    cfg = AgentConfig.build(state_dir=tmp_path, env={})
    assert cfg.concurrency == 4
    assert cfg.runtime_python == sys.executable
    assert cfg.dags_folder is None
    assert cfg.runtime_airflow_home == tmp_path / "airflow"
    assert cfg.log_folder == tmp_path / "logs"
    assert cfg.lease_wait == 30.0 and cfg.heartbeat_interval == 10.0
    assert cfg.secret_backend == "auto"
    assert cfg.status_file == tmp_path / "status.json"
    with pytest.raises(FrozenInstanceError):
        cfg.concurrency = 8  # type: ignore[misc]


def test_direct_construction_fills_derived_paths(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path)
    assert cfg.log_folder == tmp_path / "logs"
    assert cfg.runtime_airflow_home == tmp_path / "airflow"


def test_env_values_and_options_override_them(tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    env = {"EDGE_AGENT_CONCURRENCY": "7", "EDGE_AGENT_DAGS_FOLDER": str(dags), "EDGE_AGENT_SECRET_BACKEND": "FILE",
           "RUNTIME_DIRECTORY": "/run/edge-agent"}
    cfg = AgentConfig.build(state_dir=tmp_path, env=env)
    assert (cfg.concurrency, cfg.dags_folder, cfg.secret_backend) == (7, dags, "file")
    assert cfg.runtime_dir == Path("/run/edge-agent")
    assert AgentConfig.build(state_dir=tmp_path, concurrency=2, secret_backend="keyring", env=env).concurrency == 2


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"concurrency": 0}, {}, "between 1 and"),
        ({}, {"EDGE_AGENT_CONCURRENCY": "four"}, "whole number"),
        ({"runtime_python": "/nonexistent/python"}, {}, "not an executable file"),
        ({"dags_folder": "/nonexistent/dags"}, {}, "does not exist"),
        ({"secret_backend": "vault"}, {}, "secret backend must be one of"),
        ({"lease_wait": 0}, {}, "lease wait must be positive"),
    ],
)
def test_invalid_values_are_config_errors(tmp_path: Path, kwargs: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        AgentConfig.build(state_dir=tmp_path, env=env, **kwargs)
    assert info.value.exit_code == 2


def test_token_sources(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  eat1_from_file \n")
    assert read_token(None, str(f), env={}) == "eat1_from_file"
    assert read_token(None, "-", env={}, stdin=io.StringIO("eat1_from_stdin\nignored\n")) == "eat1_from_stdin"
    assert read_token("eat1_from_option", None, env={"EDGE_AGENT_TOKEN": "x"}) == "eat1_from_option"
    assert read_token(None, None, env={"EDGE_AGENT_TOKEN": "eat1_from_env"}) == "eat1_from_env"


@pytest.mark.parametrize(
    ("token", "token_file", "message"),
    [
        ("a", "b", "not both"),
        (None, None, "no registration token"),
        (None, "/nonexistent/token", "cannot read token file"),
    ],
)
def test_token_errors(token: str | None, token_file: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_token(token, token_file, env={})


def test_empty_token_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(None, str(tmp_path / "t"), env={})


def test_registration_config_ignores_run_only_settings(tmp_path: Path) -> None:
    env = {"EDGE_AGENT_DAGS_FOLDER": "/nonexistent", "EDGE_AGENT_RUNTIME_PYTHON": "/nonexistent/python",
           "EDGE_AGENT_SECRET_BACKEND": "file"}
    cfg = AgentConfig.for_registration(state_dir=tmp_path, env=env)
    assert (cfg.state_dir, cfg.secret_backend) == (tmp_path, "file")
    with pytest.raises(ConfigError, match="secret backend"):
        AgentConfig.for_registration(state_dir=tmp_path, secret_backend="plaintext", env={})
