"""Fixtures of the security suite: the integration suite's real gateway, on a home with Airflow's tables.

``tests/integration/conftest.py`` is loaded by path (the test folders are not packages) and its
helpers reused: ``_make_home`` (SQLite file, CA, environment) and ``_launch`` (the gateway
subprocess over real TLS). The one difference is ``airflow db migrate`` before the launch, so an
Execution API attack can be shown not to have moved Airflow's task instance row.

* ``gateway``: one gateway process for the session (stopped at the end, exit code checked).
* ``start_gateway``: a private one a test may stop (from the integration conftest).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from secsupport import migrate_airflow_db

_INTEGRATION_CONFTEST = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"


def _load_integration_fixtures():
    name = "_edge_agent_integration_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _INTEGRATION_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


integration = _load_integration_fixtures()
GatewayProcess = integration.GatewayProcess
Enrolled = integration.Enrolled
start_gateway = integration.start_gateway  # re-exported fixture


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    home = integration._make_home(tmp_path_factory.mktemp("security-home"))
    migrate_airflow_db(home.env, home.path)
    gw = integration._launch(home)
    yield gw
    code = gw.stop()
    assert code == 0, f"gateway exited with {code}:\n{gw.log_text()}"
