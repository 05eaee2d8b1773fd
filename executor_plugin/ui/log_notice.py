"""Where a task's log is when its queue keeps logs in the agent's region (``logs = local``).

The hosted side never receives such a log, so Airflow's log view would show nothing but a failed
attempt to reach a log server on the agent's host. A one-line notice file is written next to where
a shipped log would be, ``{base_log_folder}/{log_path}.location``: Airflow's file task handler reads
every file whose name starts with the log file's name (``_read_from_local`` globs ``attempt=1.log*``),
so the task's log view shows the notice while the task runs and after it ended.

The gateway writes it when it leases a job of such a queue (:func:`write_local_log_notice`); a
later lease of the same try (the first agent refused it) replaces it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

NOTICE_SUFFIX = ".location"


def local_log_notice(*, agent_name: str, agent_id: str, queue: str, log_path: str) -> str:
    """The sentence shown in the task's log view."""
    return (
        f"This task's log stays in the agent's region (queue {queue!r} keeps task logs local): it is on "
        f"edge agent {agent_name} ({agent_id}), file {log_path} under the agent's log folder "
        "(by default <agent state dir>/logs)"
    )


def notice_line(text: str, now: datetime | None = None) -> str:
    """One JSON log line in the Task SDK's format, so the log view renders it like any other line."""
    stamp = (now or datetime.now(timezone.utc)).isoformat()
    return json.dumps({"timestamp": stamp, "level": "info", "event": text, "logger": "edge_agent"}) + "\n"


def notice_path(base_log_folder: Path, log_path: str) -> Path | None:
    """``{base}/{log_path}.location``, or None when that would escape ``base`` (never write outside)."""
    base = base_log_folder.resolve()
    target = (base / f"{log_path}{NOTICE_SUFFIX}").resolve()
    return target if target.is_relative_to(base) else None


def write_local_log_notice(
    base_log_folder: Path,
    *,
    log_path: str | None,
    agent_name: str,
    agent_id: str,
    queue: str,
    now: datetime | None = None,
) -> Path | None:
    """Write (or replace) the notice file atomically; return its path, None when there is no place.

    Atomic (temp file + rename in the same directory) so a log view reading at that moment sees the
    old notice or the new one, never half a line. The temp file's name starts with a dot: Airflow's
    glob of ``attempt=N.log*`` cannot pick it up.
    """
    if not log_path:
        return None
    target = notice_path(base_log_folder, log_path)
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    text = notice_line(local_log_notice(agent_name=agent_name, agent_id=agent_id, queue=queue, log_path=log_path), now)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # task logs are readable by the api-server like any shipped log
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["NOTICE_SUFFIX", "local_log_notice", "notice_line", "notice_path", "write_local_log_notice"]
