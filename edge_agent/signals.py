"""SIGTERM/SIGINT handling: the handlers only change the agent's state; repeated signals escalate.

1st signal: ``agent.stop_gracefully`` (drain: stop leasing, finish running tasks, report, exit 0;
            after ``--drain-grace`` seconds the agent itself turns the drain into a cancel).
2nd signal: ``agent.stop_now`` (cancel running tasks at once: SIGTERM, SIGKILL after
            ``--cancel-grace``; each reported FAILED with the reason, or spooled; exit 0).
3rd signal: ``agent.abort`` (leave without waiting).

A handler runs on the main thread between two bytecodes, possibly while that thread holds a lock:
it must not log, write files or take a non-reentrant lock. The agent's stop methods only touch its
RLock-guarded condition, which is safe to re-enter.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from edge_agent.agent import Agent

HANDLED = (signal.SIGTERM, signal.SIGINT)


def install(agent: "Agent") -> Callable[[], None]:
    """Install the handlers (main thread only); returns a function restoring the previous ones."""
    received = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            agent.stop_gracefully(f"{name} received: draining (send it again to cancel running tasks now)")
        elif received == 2:
            agent.stop_now(f"{name} received twice: cancelling running tasks")
        else:
            agent.abort(f"{name} received {received} times")

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


__all__ = ["install"]
