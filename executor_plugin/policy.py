"""Pure decisions about compliance isolation: which queues an agent may serve, where logs may go,
and whether a registration token's scope contradicts a queue policy.

No database, no I/O: :mod:`executor_plugin.store` reads the rows and calls these functions, the
admin commands call them to explain a refusal. Every decision starts from server-side facts only
(the agent row, made from its registration token, and the queue policies); nothing an agent sends
takes part.

A queue policy names the regions a queue's tasks may run in, as ``fnmatch`` patterns matched
case-sensitively (``eu-*`` admits ``eu-west-1``, not ``EU-west-1``), and whether task logs may
leave the agent's region (``logs = hosted``) or must stay there (``local``). A queue without a
policy may run in any region and ships its logs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

LOGS_HOSTED = "hosted"
LOGS_LOCAL = "local"
LOG_POLICIES = (LOGS_HOSTED, LOGS_LOCAL)

#: What a region pattern may contain: the region alphabet plus fnmatch's ``* ? [ ] !``.
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")


class PolicyError(ValueError):
    """A policy or pattern is malformed; the message says what to change."""


class AgentFacts(Protocol):
    """The server-side facts about an agent that decisions read (``store.Agent`` has them)."""

    @property
    def id(self) -> str: ...

    @property
    def queues(self) -> tuple[str, ...]: ...

    @property
    def region(self) -> str: ...

    @property
    def state(self) -> str: ...


@dataclass(frozen=True)
class QueuePolicy:
    queue: str
    #: fnmatch patterns of the regions the queue's tasks may run in; None means any region.
    regions: tuple[str, ...] | None
    logs: str = LOGS_HOSTED
    updated_at: datetime | None = None


def validate_region_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """Check and de-duplicate region patterns (order kept); raises :class:`PolicyError`."""
    cleaned: list[str] = []
    for raw in patterns:
        pattern = raw.strip()
        if not _PATTERN_RE.match(pattern):
            raise PolicyError(
                f"invalid region pattern {raw!r}: use letters, digits, '_', '.', '-' and the wildcards "
                "'*', '?', '[...]' (1 to 64 characters)"
            )
        if pattern.count("[") != pattern.count("]"):
            raise PolicyError(f"invalid region pattern {raw!r}: unbalanced '[' ']'")
        cleaned.append(pattern)
    if not cleaned:
        raise PolicyError("give at least one region pattern, e.g. eu-west-1 or 'eu-*'")
    return tuple(dict.fromkeys(cleaned))


def validate_log_policy(value: str) -> str:
    if value not in LOG_POLICIES:
        raise PolicyError(f"invalid log policy {value!r}: use {' or '.join(LOG_POLICIES)}")
    return value


def region_allowed(region: str, patterns: Sequence[str] | None) -> bool:
    """True when ``region`` matches one of ``patterns`` (None: no restriction)."""
    if patterns is None:
        return True
    # fnmatchcase, not fnmatch: fnmatch folds case on some platforms, and a policy must mean the
    # same thing wherever the gateway runs.
    return any(fnmatch.fnmatchcase(region, pattern) for pattern in patterns)


def may_lease(agent: AgentFacts, queue: str, policy: QueuePolicy | None) -> tuple[bool, str]:
    """May ``agent`` be handed a job of ``queue`` under ``policy``? Returns ``(allowed, reason)``."""
    if agent.state != "active":
        return False, f"agent {agent.id} is {agent.state}"
    if queue not in agent.queues:
        return False, f"queue {queue!r} is not granted to agent {agent.id}"
    if policy is not None and not region_allowed(agent.region, policy.regions):
        allowed = ", ".join(policy.regions or ())
        return False, f"queue {queue!r} may only run in regions {allowed}; agent {agent.id} is in {agent.region}"
    return True, "allowed"


def servable_queues(agent: AgentFacts, policies: Mapping[str, QueuePolicy]) -> tuple[str, ...]:
    """The queues a lease may draw from now: those :func:`may_lease` allows (granted, region
    admitted by the queue's policy, agent active)."""
    return tuple(queue for queue in agent.queues if may_lease(agent, queue, policies.get(queue))[0])


def token_conflicts(queues: Sequence[str], region: str, policies: Mapping[str, QueuePolicy]) -> list[str]:
    """Why a token for ``queues`` in ``region`` contradicts a policy (empty list: it does not)."""
    problems = []
    for queue in queues:
        policy = policies.get(queue)
        if policy is not None and not region_allowed(region, policy.regions):
            problems.append(
                f"queue {queue!r} may only run in regions {', '.join(policy.regions or ())}, not {region}"
            )
    return problems


def excluded_agents(policy: QueuePolicy, agents: Iterable[AgentFacts]) -> list[AgentFacts]:
    """Agents granted ``policy.queue`` (and not revoked) whose region the policy does not admit."""
    return [
        agent
        for agent in agents
        if agent.state != "revoked"
        and policy.queue in agent.queues
        and not region_allowed(agent.region, policy.regions)
    ]


def could_serve(agent: AgentFacts, queue: str, policy: QueuePolicy | None) -> bool:
    """Could ``agent`` lease a job of ``queue`` now or after a ``resume`` (draining counts)?"""
    if agent.state not in ("active", "draining"):
        return False
    return queue in agent.queues and region_allowed(agent.region, _regions(policy))


def log_policy(policy: QueuePolicy | None) -> str:
    return policy.logs if policy is not None else LOGS_HOSTED


def _regions(policy: QueuePolicy | None) -> tuple[str, ...] | None:
    return policy.regions if policy is not None else None


__all__ = [
    "LOGS_HOSTED",
    "LOGS_LOCAL",
    "LOG_POLICIES",
    "AgentFacts",
    "PolicyError",
    "QueuePolicy",
    "could_serve",
    "excluded_agents",
    "log_policy",
    "may_lease",
    "region_allowed",
    "servable_queues",
    "token_conflicts",
    "validate_log_policy",
    "validate_region_patterns",
]
