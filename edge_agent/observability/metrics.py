"""The agent's metrics, kept in memory and rendered in Prometheus' text format (version 0.0.4).

Counters and the lease-wait histogram are pushed by the loops as things happen; gauges (running
jobs, free slots, spool size, certificate expiry, gateway reachability) are read from the agent
when a scrape comes in, so they can never drift from what the agent actually holds.

No client library: the exposition format is a few lines of text, and the agent's control process
must stay small (it runs on customers' machines next to their tasks).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Mapping

#: Upper bounds (seconds) of the lease-wait histogram: from an instant wake-up to a full long-poll.
LEASE_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]
GaugeSource = Callable[[], "Mapping[str, float | None]"]

#: name -> (type, help) of every metric the agent exports; the single list operators read.
METRICS: dict[str, tuple[str, str]] = {
    "edge_agent_jobs_started_total": ("counter", "Jobs whose task supervisor started on this agent."),
    "edge_agent_jobs_finished_total": ("counter", "Jobs that ended, by final state reported."),
    "edge_agent_jobs_refused_total": ("counter", "Leases refused by this agent's local policy."),
    "edge_agent_gateway_errors_total": ("counter", "Failed calls to the gateway (any loop)."),
    "edge_agent_lease_wait_seconds": ("histogram", "Time from asking for work to receiving a lease."),
    "edge_agent_jobs_running": ("gauge", "Jobs this agent holds that have not exited."),
    "edge_agent_slots_free": ("gauge", "Task slots free for new work."),
    "edge_agent_slots_total": ("gauge", "Task slots configured (--concurrency)."),
    "edge_agent_spool_jobs": ("gauge", "Jobs with reports spooled on disk, waiting for the gateway."),
    "edge_agent_spool_bytes": ("gauge", "Bytes of spooled reports on disk."),
    "edge_agent_cert_expiry_seconds": ("gauge", "Seconds until this agent's client certificate expires."),
    "edge_agent_gateway_up": ("gauge", "1 when the last call to the gateway succeeded, else 0."),
    "edge_agent_draining": ("gauge", "1 while the agent takes no new work (drain, stop or server drain)."),
}


def _labels(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


class Metrics:
    """Thread-safe counters and one histogram; gauges come from ``gauge_source`` at render time."""

    def __init__(self, gauge_source: GaugeSource | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._buckets = [0] * len(LEASE_WAIT_BUCKETS)
        self._wait_count = 0
        self._wait_sum = 0.0
        self.gauge_source = gauge_source

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if METRICS.get(name, ("",))[0] != "counter":
            raise KeyError(f"{name} is not a counter")
        key = (name, _labels(**labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def observe_lease_wait(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            self._wait_count += 1
            self._wait_sum += seconds
            for i, bound in enumerate(LEASE_WAIT_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, _labels(**labels)), 0.0)

    def render(self) -> str:
        """The whole exposition, one ``# HELP``/``# TYPE`` block per metric."""
        with self._lock:
            counters = dict(self._counters)
            buckets, count, total = list(self._buckets), self._wait_count, self._wait_sum
        gauges: Mapping[str, float | None] = {}
        if self.gauge_source is not None:
            try:
                gauges = self.gauge_source()
            except Exception:  # a scrape must not take the agent down; the counters still render
                gauges = {}
        lines: list[str] = []
        for name, (kind, help_text) in METRICS.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            if kind == "counter":
                samples = sorted((labels, value) for (n, labels), value in counters.items() if n == name)
                # A counter nothing incremented yet still reads 0 (absent would look like a broken scrape).
                samples = samples or [((), 0.0)]
                for labels, value in samples:
                    lines.append(f"{name}{_fmt_labels(labels)} {_fmt(value)}")
            elif kind == "histogram":
                for bound, n in zip(LEASE_WAIT_BUCKETS, buckets):
                    lines.append(f'{name}_bucket{{le="{_fmt(bound)}"}} {n}')
                lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
                lines.append(f"{name}_sum {_fmt(total)}")
                lines.append(f"{name}_count {count}")
            else:
                value = gauges.get(name)
                if value is not None:
                    lines.append(f"{name} {_fmt(float(value))}")
        return "\n".join(lines) + "\n"


def _fmt_labels(labels: Iterable[tuple[str, str]]) -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


__all__ = ["LEASE_WAIT_BUCKETS", "METRICS", "Metrics"]
