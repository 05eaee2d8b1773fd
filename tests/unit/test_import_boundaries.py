"""The agent's control process never loads Airflow, SQLAlchemy or FastAPI, and the CLI starts light.

Each check runs in a fresh interpreter: this test process has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("airflow", "sqlalchemy", "fastapi", "starlette", "executor_plugin")

CONTROL_MODULES = [
    "edge_agent.sdnotify",
    "edge_agent.service",
    "edge_agent.doctor",
    "edge_agent.cli",
    "edge_agent.agent",
    "edge_agent.protocol",
    "edge_agent.client",
    "edge_agent.transport",
    "edge_agent.lease_loop",
    "edge_agent.heartbeat",
    "edge_agent.logship",
    "edge_agent.signals",
    "edge_agent.identity.enroll",
    "edge_agent.identity.keystore",
    "edge_agent.identity.pki_utils",
    "edge_agent.observability.status",
    "edge_agent.runtime",
    "edge_agent.forwarder",
    "edge_agent.policy",
    "edge_agent.audit",
    "edge_agent.rotation",
    "edge_agent.statelock",
    "edge_agent.identity.unregister",
]


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_control_process_modules_do_not_load_airflow_sqlalchemy_or_fastapi() -> None:
    loaded = loaded_after("\n".join(f"import {m}" for m in CONTROL_MODULES))
    assert not loaded & set(FORBIDDEN), loaded & set(FORBIDDEN)


def test_building_the_agent_and_running_the_cli_stays_clean() -> None:
    # Exercise more than imports: build the typer command tree and render help, load the default
    # runtime and forwarder factories' modules through the Agent.
    code = (
        "from typer.main import get_command\n"
        "from edge_agent.cli import app\n"
        "get_command(app)\n"
        "from edge_agent.agent import default_runtime_factory, default_forwarder_factory\n"
        "import edge_agent.runtime, edge_agent.forwarder\n"
    )
    loaded = loaded_after(code)
    assert not loaded & set(FORBIDDEN), loaded & set(FORBIDDEN)


@pytest.mark.parametrize("heavy", ["httpx", "cryptography", "keyring"])
def test_cli_import_leaves_heavy_libraries_for_the_commands(heavy: str) -> None:
    # 'edge-agent --help' should not pay for TLS and HTTP libraries it does not use.
    assert heavy not in loaded_after("import edge_agent.cli")
