"""The state directory's lock: one process at a time may act as the agent of a state directory.

``edge-agent run`` holds it for its whole life; ``edge-agent unregister`` takes it so it never wipes
the key from under a running agent, and so no agent starts while it wipes. It is an ``flock`` on
``<state dir>/agent.lock``, released by the kernel when the process dies (no stale lock files).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from edge_agent.errors import ConfigError, StateDirBusy

LOCK_FILE = "agent.lock"


def acquire(state_dir: Path) -> int:
    """Take the lock without waiting; returns the descriptor to close. Raises :class:`StateDirBusy`."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise StateDirBusy(
            f"another 'edge-agent run' (pid {other or '?'}) already uses {state_dir}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def held(state_dir: Path) -> Iterator[None]:
    fd = acquire(state_dir)
    try:
        yield
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "acquire", "held"]
