"""Fixtures for the packaging tests: the standalone binary (built once per session), the integration
suite's real gateway, and the rule for tools missing on the machine.

A tool this suite needs (PyInstaller's build venv, systemd-analyze, dpkg-deb, hadolint,
kubernetes-validate) skips its tests on a developer machine that lacks it, but fails them under
``CI=true``: CI must not go green without having run them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkg_helpers import ROOT, need

BUILD_TIMEOUT = 900

# The integration suite's gateway fixtures (a real gateway process on a temporary SQLite database),
# loaded under their own module name so the two conftest files do not shadow each other.
_spec = importlib.util.spec_from_file_location(
    "edge_agent_integration_conftest", ROOT / "tests" / "integration" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _integration
_spec.loader.exec_module(_integration)
gateway = _integration.gateway
start_gateway = _integration.start_gateway
GatewayProcess = _integration.GatewayProcess


@pytest.fixture(scope="session")
def onedir_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The onedir ``edge-agent`` built by packaging/build.py (or $EDGE_AGENT_TEST_BINARY, prebuilt).

    The build venv stays in build/pyi-venv and is reused while the dependency list is unchanged,
    so only the first run on a machine downloads PyInstaller.
    """
    prebuilt = os.environ.get("EDGE_AGENT_TEST_BINARY")
    if prebuilt:
        return Path(prebuilt)
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "build.py"), "--onedir", "--dist", str(dist)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=ROOT,
    )
    offline = ("Could not find a version", "Failed to establish", "No matching distribution")
    if result.returncode != 0 and any(s in result.stderr for s in offline):
        need(False, "cannot install PyInstaller into build/pyi-venv (no package index reachable)")
    assert result.returncode == 0, f"build failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    exe = dist / "onedir" / "edge-agent" / "edge-agent"
    assert os.access(exe, os.X_OK), result.stdout
    return exe


@pytest.fixture
def agent_processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at teardown are killed (after the test's own stop)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
