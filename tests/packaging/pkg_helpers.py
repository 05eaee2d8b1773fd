"""Helpers shared by the packaging tests (a module of its own: test files cannot import a conftest)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Waiting for an agent's log line: the runtime imports the Task SDK on a shared 2-core machine.
WAIT = 180.0


def need(condition: bool, why: str) -> None:
    """Skip when ``condition`` is false, except under CI=true, where it is a failure."""
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why} (CI=true: this suite must run in CI; see scripts/install-test-deps.sh)")
    pytest.skip(why)


def need_tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (Debian package {debian_package!r})")
    assert path is not None
    return path


def venv_tool(name: str, pypi_package: str) -> str:
    """A console script of a test dependency installed in this venv."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    need(path is not None, f"{name} is not installed (PyPI package {pypi_package!r}, in the 'test' extra)")
    assert path is not None
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child agent: none of this process's Airflow or agent settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "EDGE_AGENT", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIRECTORY"))
           and k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
    env["EDGE_AGENT_SECRET_BACKEND"] = "file"
    env.update(extra)
    return env


class Lines:
    """Reads a process's stderr on a thread; tests wait for a matching line, not on a clock."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        rx = re.compile(pattern)
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"process ended before {pattern!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            match = rx.search(line)
            if match:
                return match
