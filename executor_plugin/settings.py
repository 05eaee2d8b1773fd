"""The ``[edge_agent]`` section of the hosted side's Airflow config, read once into one object."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

SECTION = "edge_agent"

#: Default of ``[edge_agent] agent_dead_after_seconds``: three missed beats of the agent's default
#: 10 s heartbeat.
DEFAULT_AGENT_DEAD_AFTER_SECONDS = 30.0


class SettingsError(ValueError):
    """A value in the ``[edge_agent]`` section is unusable; the message names the option and the fix."""


@dataclass(frozen=True)
class HostedSettings:
    ca_dir: Path
    trust_domain: str
    cert_ttl: timedelta
    #: A leased job not confirmed as started within this time goes back to the queue.
    lease_ttl: timedelta
    #: How often a waiting long-poll re-checks the table (cross-process wake-up on SQLite).
    lease_poll_interval: float
    base_log_folder: Path
    executor: str
    #: Extra DNS names or addresses agents use to reach the gateway (put in its server certificate).
    gateway_hostnames: tuple[str, ...] = ()
    #: An agent is online iff its last heartbeat is younger than this; the executor requeues the
    #: leased (not started) jobs of an agent that is not.
    agent_dead_after: timedelta = timedelta(seconds=DEFAULT_AGENT_DEAD_AFTER_SECONDS)

    @classmethod
    def from_airflow_conf(cls) -> "HostedSettings":
        from airflow.configuration import AIRFLOW_HOME, conf

        ca_dir = conf.get(SECTION, "ca_dir", fallback="") or os.path.join(AIRFLOW_HOME, "edge_agent", "ca")
        return cls(
            ca_dir=Path(ca_dir),
            trust_domain=conf.get(SECTION, "trust_domain", fallback="edge-agent.local"),
            cert_ttl=timedelta(seconds=conf.getint(SECTION, "cert_ttl_seconds", fallback=24 * 3600)),
            lease_ttl=timedelta(seconds=conf.getint(SECTION, "lease_ttl_seconds", fallback=60)),
            lease_poll_interval=conf.getfloat(SECTION, "lease_poll_interval", fallback=0.1),
            base_log_folder=Path(conf.get("logging", "base_log_folder")),
            executor=conf.get("core", "executor"),
            gateway_hostnames=tuple(
                h.strip() for h in conf.get(SECTION, "gateway_hostnames", fallback="").split(",") if h.strip()
            ),
            agent_dead_after=agent_dead_after_from_conf(),
        )


def parse_agent_dead_after(text: str) -> timedelta:
    """``agent_dead_after_seconds`` as a timedelta; a clear :class:`SettingsError` unless a finite number > 0.

    Zero or a negative window would declare every agent dead on every scheduler loop and requeue
    each job the moment it is leased.
    """
    try:
        seconds = float(text.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise SettingsError(
            f"[{SECTION}] agent_dead_after_seconds must be a number of seconds greater than 0 "
            f"(default {DEFAULT_AGENT_DEAD_AFTER_SECONDS:g}), got {text.strip()!r}"
        )
    return timedelta(seconds=seconds)


def agent_dead_after_from_conf() -> timedelta:
    """Read and validate ``[edge_agent] agent_dead_after_seconds`` (also used alone by the executor)."""
    from airflow.configuration import conf

    raw = conf.get(SECTION, "agent_dead_after_seconds", fallback=str(DEFAULT_AGENT_DEAD_AFTER_SECONDS))
    return parse_agent_dead_after(str(raw))


__all__ = [
    "DEFAULT_AGENT_DEAD_AFTER_SECONDS",
    "HostedSettings",
    "SettingsError",
    "agent_dead_after_from_conf",
    "parse_agent_dead_after",
]
