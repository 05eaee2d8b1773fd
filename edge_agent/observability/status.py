"""``<state_dir>/status.json``: what a running agent is doing now, for ``edge-agent status`` and health checks.

The agent pushes facts into a :class:`StatusBoard` (each loop a one-line "what I am doing now", the
jobs, the slots, the last heartbeat); the board rewrites the file atomically whenever a fact changes,
so a reader never sees a half-written file. Nothing secret goes in here.

Outages: ``gateway`` is ``{"reachable": bool|null, "since": ISO|null, "last_error": str|null}``,
where ``since`` is the start of the current outage or of the current reachable streak (null before
the first call) and ``last_error`` the error of the current outage (null while reachable);
``spool`` is ``{"jobs": int, "bytes": int}``, the job records with reports still to deliver. The
board logs one line when the gateway becomes unreachable and one when it is back, with the
outage's length. ``gateway_reachable`` and ``last_error`` at the top level are kept for readers of
older versions.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

STATUS_FILE = "status.json"

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def outage_seconds(gateway: object, now: datetime | None = None) -> float | None:
    """Seconds since ``gateway["since"]`` of a status file's gateway object, or None."""
    if not isinstance(gateway, dict) or not isinstance(gateway.get("since"), str):
        return None
    try:
        since = datetime.fromisoformat(gateway["since"])
    except ValueError:
        return None
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return max(0.0, ((now or datetime.now(timezone.utc)) - since).total_seconds())


class StatusBoard:
    """Thread-safe holder of the agent's status; writes the file on every change.

    Callers must not hold the agent's condition when calling in: a signal handler may take that
    condition on the main thread while the main thread holds this board's lock, so holding it here
    and waiting for the board would deadlock. Signal handlers must not call the board at all.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        #: Called on every failed call to the gateway (the agent counts them for /metrics).
        self.on_gateway_error: Callable[[], None] | None = None
        self._data: dict[str, Any] = {
            "pid": os.getpid(),
            "started_at": _now(),
            "state": "starting",
            "activity": {},
            "jobs": [],
            "free_slots": None,
            "total_slots": None,
            "gateway_reachable": None,
            "last_error": None,
            "last_heartbeat": None,
            "gateway": {"reachable": None, "since": None, "last_error": None},
            "spool": {"jobs": 0, "bytes": 0},
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._data))

    def reachable(self) -> bool | None:
        """The outcome of the latest call to the gateway (None before the first), without a snapshot."""
        with self._lock:
            return self._data["gateway"]["reachable"]

    def set(self, **fields: Any) -> None:
        """Replace top-level fields; written to disk only if something changed."""
        with self._lock:
            changed = False
            for key, value in fields.items():
                if self._data.get(key) != value:
                    self._data[key] = value
                    changed = True
            if changed:
                self._write()

    def activity(self, loop: str, text: str) -> None:
        """Publish a loop's one-line "what I am doing now"."""
        with self._lock:
            if self._data["activity"].get(loop) != text:
                self._data["activity"][loop] = text
                self._write()

    def gateway(self, ok: bool, error: str | None = None) -> None:
        """Record the outcome of the latest call to the gateway (any loop)."""
        with self._lock:
            if self._record_gateway(ok, error):
                self._write()

    def heartbeat(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            self._data["last_heartbeat"] = {"ok": ok, "at": _now(), "error": error}
            self._record_gateway(ok, error)
            self._write()

    def _record_gateway(self, ok: bool, error: str | None) -> bool:
        """Update both gateway views under the lock; True if anything changed."""
        if not ok and self.on_gateway_error is not None:
            self.on_gateway_error()
        gw = self._data["gateway"]
        changed = False
        if gw["reachable"] is not ok:
            was, since = gw["reachable"], gw["since"]
            now = _now()
            if was is True and not ok:
                log.warning("gateway unreachable: %s (running tasks go on; reports are spooled)", error)
            elif was is False and ok:
                seconds = outage_seconds({"since": since})
                log.info("gateway reachable again after an outage of %s s", f"{seconds:.0f}" if seconds is not None else "?")
            gw.update(reachable=ok, since=now)
            self._data["gateway_reachable"] = ok  # always equal to gateway.reachable
            changed = True
        wanted_error = None if ok else (error or gw["last_error"])
        if gw["last_error"] != wanted_error:
            gw["last_error"] = wanted_error
            changed = True
        if error is not None and self._data["last_error"] != error:
            self._data["last_error"] = error
            changed = True
        return changed

    def _write(self) -> None:
        if self._path is None:
            return
        self._data["updated_at"] = _now()
        data = (json.dumps(self._data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".status.", suffix=".tmp", dir=self._path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, self._path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError:
            # Status is advisory: a full disk must not take the agent (and its running tasks) down.
            pass


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status a (possibly dead) agent wrote, or None; adds ``alive`` from a pid check."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    data["alive"] = _pid_alive(data.get("pid"))
    return data


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


__all__ = ["STATUS_FILE", "StatusBoard", "outage_seconds", "read_status"]
