"""Prints where a task process runs, so the e2e tests can prove which process tree executed it.

The tests compare ``ancestors`` with the pid of each agent's ``edge-agent run`` process: a task that
an agent ran descends from it (control -> runtime zygote -> supervisor -> task); a hosted
LocalExecutor task does not. ``marker`` is an environment variable the tests give only to agents.
This helper is kept free of the scheduler's trigger words so the parser skips the file.
"""

from __future__ import annotations

import json
import os

PROBE_PREFIX = "EDGE_PROBE "
MARKER_ENV = "E2E_AGENT_MARKER"


def _ancestors(pid: int) -> list[int]:
    chain: list[int] = []
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        with open(f"/proc/{pid}/stat") as stat:
            # The command name may contain spaces and parentheses: split after the last ")".
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    return chain


def report(label: str) -> dict:
    info = {
        "label": label,
        "pid": os.getpid(),
        "ancestors": _ancestors(os.getpid()),
        "marker": os.environ.get(MARKER_ENV, ""),
    }
    print(PROBE_PREFIX + json.dumps(info), flush=True)
    return info
