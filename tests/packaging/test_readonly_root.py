"""The agent under the container image's constraints, without a container engine: a read-only root
filesystem (only the state dir, a tmpfs /tmp and a tmpfs runtime dir are writable), no capabilities
and no_new_privs, against a real gateway; then SIGTERM drains it and it exits 0.

The constraints come from a private mount namespace (``unshare --mount``) and ``setpriv``; nothing
outside the namespace changes. This machine's Python lives under /root (0700), so the process stays
uid 0 here but holds no capability: it cannot write where the image's uid 65532 could not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pkg_helpers import Lines, clean_env, need, need_tool

SANDBOX = r"""
set -eu
state=$1; scratch=$2; shift 2
mount --bind "$state" "$state"          # its own mount: stays writable below
mount -o remount,bind,ro /
mount -t tmpfs -o mode=1777,size=256m tmpfs "$scratch/tmp"
mount -t tmpfs -o mode=0700,size=16m tmpfs "$scratch/run"
# Prove the root is read-only before the agent starts.
if touch /edge-agent-probe 2>/dev/null; then echo "root is writable" >&2; exit 97; fi
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"
"""


def test_agent_runs_on_a_read_only_root_without_capabilities_and_drains(gateway, tmp_path, agent_processes) -> None:
    need(os.geteuid() == 0, "needs root to create a mount namespace")
    unshare = need_tool("unshare", "util-linux")
    need_tool("setpriv", "util-linux")
    agent = Path(sys.executable).parent / "edge-agent"

    queue = gateway.new_queue()
    state = tmp_path / "state"
    token = gateway.mint_token(queues=[queue])
    reg = subprocess.run([str(agent), "register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(state)],
                         input=str(token), capture_output=True, text=True, timeout=120, env=clean_env())
    assert reg.returncode == 0, reg.stderr
    scratch = tmp_path / "scratch"
    for d in ("tmp", "run", "dags"):
        (scratch / d).mkdir(parents=True)
    job_id = gateway.enqueue(queue)

    env = clean_env(TMPDIR=str(scratch / "tmp"), RUNTIME_DIRECTORY=str(scratch / "run"), HOME=str(state),
                    PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX, "sandbox", str(state), str(scratch),
         str(agent), "run", "--state-dir", str(state), "--runtime-python", sys.executable,
         "--dags-folder", str(scratch / "dags"), "--concurrency", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    agent_processes.append(proc)
    out = Lines(proc)
    out.wait_for(r"runtime ready: pid \d+, task SDK")
    out.wait_for(rf"job {job_id} exited with \d+ \(.*\)")
    proc.send_signal(signal.SIGTERM)  # setpriv exec'd the agent: this is the agent's pid
    out.wait_for(r"agent stopped")
    assert proc.wait(60) == 0, "".join(out.lines)
    assert not any("Read-only file system" in line for line in out.lines), "".join(out.lines)
    # What the agent wrote went to the state dir.
    assert (state / "status.json").exists() and (state / "logs").is_dir()
