"""The steady-state ``edge-agent run`` path stays light: no ``cryptography``, no httpx command-line client.

``cryptography`` is needed to register and to renew (a new key, a CSR), and nowhere else; loaded, it
costs about 8 MB RSS for the life of the control process, against a 60 MB target
(docs/benchmarks.md, §3). httpx's command-line client (click, rich, pygments) costs about 5 MB.

Each check runs the control process's start-up steps in a fresh interpreter: the command tree, every
module ``run`` loads, the stored identity, the mTLS client, the API client and the renewal schedule.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timezone
from pathlib import Path

import pytest
import trustme

from edge_agent.identity import certinfo
from edge_agent.identity.keystore import Keystore, StoredIdentity

RUN_PATH_MODULES = [
    "edge_agent.agent", "edge_agent.client", "edge_agent.config", "edge_agent.forwarder", "edge_agent.heartbeat",
    "edge_agent.identity.enroll", "edge_agent.identity.keystore", "edge_agent.lease_loop", "edge_agent.logship",
    "edge_agent.observability", "edge_agent.policy", "edge_agent.rotation", "edge_agent.runtime",
    "edge_agent.service", "edge_agent.signals", "edge_agent.transport",
]

START = """
from typer.main import get_command
from edge_agent.cli import app
get_command(app)
{imports}
from edge_agent.client import AgentAPI
from edge_agent.identity.keystore import Keystore
from edge_agent.transport import build_client
identity = Keystore({state!r}, "file").load()
api = AgentAPI(build_client(identity.url, identity))
"""

SCHEDULE = """
from edge_agent.rotation import renewal_time
renewal_time(identity.cert_pem, 0.8)
"""


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = trustme.CA()
    leaf = ca.issue_cert("agent.test")
    cert_pem = leaf.cert_chain_pems[0].bytes().decode()
    state = tmp_path_factory.mktemp("state")
    Keystore(state, "file").save(StoredIdentity(
        agent_id="ag_1", name="edge-1", queues=("q",), region="r", url="https://127.0.0.1:9",
        executor="executor_plugin.executor.EdgeAgentExecutor",
        cert_not_after=certinfo.not_after(cert_pem).astimezone(timezone.utc), cert_pem=cert_pem,
        ca_pems=(ca.cert_pem.bytes().decode(),), key_pem=leaf.private_key_pem.bytes(),
    ))
    return state


def loaded_after(code: str) -> dict[str, bool]:
    probe = textwrap.dedent(code) + (
        "\nimport json, sys\n"
        "print(json.dumps({'cryptography': 'cryptography' in sys.modules,"
        " 'httpx cli': sys.modules.get('httpx._main') is not None}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start(state: Path) -> str:
    return START.format(imports="\n".join(f"import {m}" for m in RUN_PATH_MODULES), state=str(state))


def test_starting_the_agent_loads_neither_cryptography_nor_the_httpx_cli(state_dir: Path) -> None:
    assert loaded_after(_start(state_dir)) == {"cryptography": False, "httpx cli": False}


def test_scheduling_the_certificate_renewal_does_not_load_cryptography(state_dir: Path) -> None:
    # The rotation loop computes its schedule at every start; only the renewal itself needs cryptography.
    assert loaded_after(_start(state_dir) + SCHEDULE) == {"cryptography": False, "httpx cli": False}
