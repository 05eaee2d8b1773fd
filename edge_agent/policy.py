"""The agent's local policy: which leased jobs this machine agrees to run, decided before any reaches the runtime.

The operator of the agent's machine narrows what the hosted side may run here, on top of what the
registration token granted (the server can only offer jobs of the agent's queues). A TOML file::

    # <state dir>/policy.toml, or `edge-agent run --policy FILE`, or $EDGE_AGENT_POLICY
    allowed_dags    = ["finance_*", "reporting_daily"]   # DAG id patterns (fnmatch, case-sensitive)
    allowed_bundles = ["dags-folder"]                     # DAG bundle names (patterns too)
    allowed_queues  = ["finance"]                         # queues (patterns too)

An absent key does not narrow; an empty list allows nothing. Anything else is an error naming the
file and the key (an unknown key, a string where a list belongs, an empty pattern): a typo such as
``allowed_dag`` must stop the agent, never read as "no narrowing" and run everything.

:func:`decide` is pure: it takes the policy and the lease and says yes or no with a reason that the
server records as the task's failure and the audit log keeps. It judges what will *run*: the
workload's own ``ti`` fields when present (the lease's copies must agree, or the job is refused, so
the audit log never records one DAG while the runtime runs another).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from edge_agent.errors import PolicyError
from edge_agent.protocol import Lease

#: The keys a policy file may hold, in the order reasons are checked.
KEYS = ("allowed_queues", "allowed_bundles", "allowed_dags")
_SUBJECT = {"allowed_queues": "queue", "allowed_bundles": "bundle", "allowed_dags": "dag"}


@dataclass(frozen=True)
class Policy:
    """Patterns per key; ``None`` for a key means the file does not narrow it."""

    source: Path | None = None
    allowed_dags: tuple[str, ...] | None = None
    allowed_bundles: tuple[str, ...] | None = None
    allowed_queues: tuple[str, ...] | None = None

    @property
    def narrows(self) -> bool:
        return any(getattr(self, key) is not None for key in KEYS)

    def describe(self) -> str:
        """One line for logs and status: where the policy comes from and what it allows."""
        if self.source is None:
            return "no local policy: every job the gateway offers is run"
        parts = [f"{key}={list(getattr(self, key))}" for key in KEYS if getattr(self, key) is not None]
        return f"{self.source}: " + (", ".join(parts) if parts else "no key set, nothing narrowed")


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str


@dataclass(frozen=True)
class JobFacts:
    """What a lease says will run, as checked by :func:`decide` and written to the audit log."""

    queue: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    bundle: str | None


def facts(lease: Lease) -> tuple[JobFacts, str | None]:
    """The job's facts (the workload's where it names them) and a mismatch with the lease, if any."""
    workload = lease.workload if isinstance(lease.workload, dict) else {}
    ti = workload.get("ti") if isinstance(workload.get("ti"), dict) else {}
    bundle_info = workload.get("bundle_info")
    bundle = bundle_info.get("name") if isinstance(bundle_info, dict) else None
    mismatch = None
    values: dict[str, Any] = {}
    for field in ("queue", "dag_id", "task_id", "run_id", "map_index", "try_number"):
        leased = getattr(lease, field)
        runs = ti.get(field, leased)
        if runs != leased and mismatch is None:
            mismatch = f"the lease names {field} {leased!r} but its workload runs {field} {runs!r}"
        values[field] = runs
    return JobFacts(bundle=bundle if isinstance(bundle, str) else None, **values), mismatch


def decide(policy: Policy, lease: Lease) -> Decision:
    """May this agent run the leased job? Pure: no I/O, no clock."""
    job, mismatch = facts(lease)
    if mismatch is not None:
        return Decision(False, f"inconsistent lease: {mismatch}")
    checks = (("allowed_queues", job.queue), ("allowed_bundles", job.bundle), ("allowed_dags", job.dag_id))
    for key, value in checks:
        patterns = getattr(policy, key)
        if patterns is None:
            continue
        subject = _SUBJECT[key]
        if value is None:
            return Decision(False, f"the workload names no {subject}, and {key} of {policy.source} is set")
        if not any(fnmatchcase(value, pattern) for pattern in patterns):
            return Decision(False, f"{subject} {value!r} not in {key} of {policy.source}")
    if policy.source is None:
        return Decision(True, "no local policy")
    return Decision(True, f"allowed by {policy.source}")


def load_policy(path: Path | None, *, required: bool) -> Policy:
    """Read and validate the policy file; ``required`` = the operator named it (missing is an error)."""
    if path is None:
        return Policy()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise PolicyError(f"policy file {path} does not exist (--policy / $EDGE_AGENT_POLICY)") from None
        return Policy()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PolicyError(
            f"policy file {path}: unknown key {unknown[0]!r} (allowed keys: {', '.join(KEYS)})"
        )
    values: dict[str, tuple[str, ...]] = {}
    for key in KEYS:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, list):
            raise PolicyError(f"policy file {path}: key {key!r} must be a list of patterns, got {type(value).__name__}")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise PolicyError(
                    f"policy file {path}: key {key!r} holds {item!r}; each entry must be a non-empty string")
        values[key] = tuple(value)
    return Policy(source=path, **values)


__all__ = ["Decision", "JobFacts", "KEYS", "Policy", "PolicyError", "decide", "facts", "load_policy"]
