"""systemd's ``sd_notify`` protocol without libsystemd: READY, WATCHDOG, STOPPING and STATUS messages.

Under ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket)
and waits for ``READY=1`` before it considers the service started. With ``WatchdogSec=`` it also sets
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives
within that time; the convention is to ping at half of it. Outside systemd (no ``$NOTIFY_SOCKET``)
every call is a no-op, so the agent calls these unconditionally.

Usage in ``edge-agent run``::

    notifier = Notifier.from_env()
    notifier.status("checking identity")
    ...                                   # config loaded, identity loaded, runtime started
    notifier.ready("serving 4 slots")
    dog = Watchdog(notifier, healthy=agent_is_healthy).start()
    ...
    notifier.stopping("draining 2 running tasks")
    dog.stop()

Standard library only; never raises on a send failure (a lost notification must not take down an
agent with running tasks: systemd then restarts it by its own rules, which is the better outcome).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: A status line longer than this is cut: systemd shows it in one line of ``systemctl status``.
MAX_STATUS = 200


def _address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace socket: a leading NUL byte instead of the '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other address forms are not used for services on a host


@dataclass
class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; a no-op when there is none (not run by systemd)."""

    address: str | bytes | None
    #: ``$WATCHDOG_USEC`` in seconds, when systemd's watchdog is on for this process; else None.
    watchdog_timeout: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> "Notifier":
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (for this ``pid``)."""
        env = os.environ if env is None else env
        timeout: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        mine = str(os.getpid() if pid is None else pid)
        # WATCHDOG_PID names the process systemd expects pings from; a child that inherited the
        # environment (the runtime zygote) must not think the watchdog is its own.
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == mine):
            timeout = int(usec) / 1_000_000
        return cls(address=_address(env.get("NOTIFY_SOCKET", "")), watchdog_timeout=timeout)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent (False when disabled or failed)."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", fields[0].split("=")[0] if fields else "", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up: systemd finishes ``systemctl start`` and starts ordering units after it."""
        return self.notify("READY=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down (draining): ``systemctl`` shows 'deactivating' meanwhile."""
        return self.notify("STOPPING=1", *([_status(status)] if status else []))

    def watchdog(self) -> bool:
        """One keep-alive ping for ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half the watchdog timeout, so one late ping does not kill the service."""
        return None if self.watchdog_timeout is None else self.watchdog_timeout / 2


def _status(text: str) -> str:
    line = " ".join(str(text).split())
    return "STATUS=" + (line if len(line) <= MAX_STATUS else line[: MAX_STATUS - 1] + "…")


class Watchdog:
    """A daemon thread that sends ``WATCHDOG=1`` every half timeout while ``healthy()`` returns True.

    ``healthy`` is the agent's own liveness test (its loops still make progress). When it returns
    False, or raises, the ping is skipped: systemd's watchdog then fires and restarts a wedged agent,
    which is the point of having one. Without a watchdog in the environment, :meth:`start` does nothing.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool] = lambda: True) -> None:
        self._notifier = notifier
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    def start(self) -> "Watchdog":
        interval = self._notifier.watchdog_interval
        if interval is None or not self._notifier.enabled or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, args=(interval,), name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, interval: float) -> None:
        while True:
            try:
                ok = bool(self._healthy())
            except Exception as exc:  # a broken probe must read as "unhealthy", not kill the thread
                log.warning("watchdog health probe failed: %s", exc)
                ok = False
            if ok:
                self._notifier.watchdog()
                self.pings += 1
            else:
                self.skipped += 1
            if self._stop.wait(interval):
                return


__all__ = ["MAX_STATUS", "Notifier", "Watchdog"]
