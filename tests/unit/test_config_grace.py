"""AgentConfig: the drain and cancel grace periods (option > env > default, validated)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import DEFAULT_CANCEL_GRACE, DEFAULT_DRAIN_GRACE, AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.service import render_unit


def test_defaults_fit_the_systemd_units_stop_timeout(tmp_path: Path) -> None:
    cfg = AgentConfig.build(state_dir=tmp_path, env={})
    assert (cfg.drain_grace, cfg.cancel_grace) == (DEFAULT_DRAIN_GRACE, DEFAULT_CANCEL_GRACE) == (540.0, 30.0)
    unit = render_unit("/usr/bin/edge-agent")
    stop = int(next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=")[1][:-1])
    # Drain, then cancel, then a margin for the last reports and the teardown.
    assert cfg.drain_grace + cfg.cancel_grace + 20 <= stop


def test_env_then_option(tmp_path: Path) -> None:
    env = {"EDGE_AGENT_DRAIN_GRACE": "120", "EDGE_AGENT_CANCEL_GRACE": " 7.5 "}
    cfg = AgentConfig.build(state_dir=tmp_path, env=env)
    assert (cfg.drain_grace, cfg.cancel_grace) == (120.0, 7.5)
    cfg = AgentConfig.build(state_dir=tmp_path, env=env, drain_grace=0, cancel_grace=1)
    assert (cfg.drain_grace, cfg.cancel_grace) == (0.0, 1.0)
    assert AgentConfig.build(state_dir=tmp_path, env={"EDGE_AGENT_DRAIN_GRACE": ""}).drain_grace == 540.0


@pytest.mark.parametrize(("kwargs", "env", "message"), [
    ({"drain_grace": -1}, {}, "drain grace must be between 0 and 604800 seconds, got -1 (from --drain-grace)"),
    ({}, {"EDGE_AGENT_DRAIN_GRACE": "9m"},
     "drain grace must be a number of seconds, got '9m' (from $EDGE_AGENT_DRAIN_GRACE)"),
    ({}, {"EDGE_AGENT_CANCEL_GRACE": "nan"}, "cancel grace must be between 0 and 604800 seconds, got 'nan'"),
    ({"cancel_grace": float("inf")}, {}, "cancel grace must be between 0 and 604800 seconds"),
    ({}, {"EDGE_AGENT_CANCEL_GRACE": "1e9"}, "from $EDGE_AGENT_CANCEL_GRACE"),
])
def test_bad_values_are_refused_with_their_source(tmp_path: Path, kwargs, env, message) -> None:
    with pytest.raises(ConfigError) as err:
        AgentConfig.build(state_dir=tmp_path, env=env, **kwargs)
    assert message in str(err.value)
