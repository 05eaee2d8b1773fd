"""What the agent tells operators: logging setup (text or JSON lines), the status file (``status.py``),
metrics (``metrics.py``) and the health/metrics endpoint (``endpoint.py``).

JSON lines (``--log-format json``) carry the agent's id on every record and, on records about one
job, the job and task-instance ids. Loops pass those as ``extra=job_fields(lease)``; nothing parses
messages to find them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")

#: Record attributes copied into a JSON line when a log call passed them (``extra=``).
JOB_FIELDS = ("job_id", "dag_id", "task_id", "run_id", "map_index", "try_number", "queue", "fencing")

#: Set once the identity is loaded; every JSON line carries it.
_agent: dict[str, str] = {}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and service wrappers swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, agent id, job fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_agent,
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def bind_agent(agent_id: str, name: str | None = None) -> None:
    """Name the agent on every JSON record from now on."""
    _agent.clear()
    _agent["agent_id"] = agent_id
    if name:
        _agent["agent_name"] = name


def job_fields(lease: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one leased job (a ``protocol.Lease``)."""
    return {
        "job_id": lease.job_id, "dag_id": lease.dag_id, "task_id": lease.task_id, "run_id": lease.run_id,
        "map_index": lease.map_index, "try_number": lease.try_number, "queue": lease.queue,
    }


def configure_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Records on stderr (journald and container runtimes keep them), text or JSON lines. Idempotent."""
    if log_format not in LOG_FORMATS:
        from edge_agent.errors import ConfigError

        raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # httpx logs every request at INFO: one line per lease poll and log chunk would drown the rest.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["JOB_FIELDS", "LOG_FORMATS", "JsonFormatter", "bind_agent", "configure_logging", "job_fields"]
