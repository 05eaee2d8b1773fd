"""The ``[edge_agent]`` section of the hosted side's Airflow config, read once into one object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

SECTION = "edge_agent"


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
        )
