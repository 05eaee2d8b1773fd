"""Pure policy decisions (``executor_plugin.policy``): region patterns, leasing, token scope."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from executor_plugin.policy import (
    LOGS_HOSTED,
    LOGS_LOCAL,
    PolicyError,
    QueuePolicy,
    could_serve,
    excluded_agents,
    log_policy,
    may_lease,
    region_allowed,
    servable_queues,
    token_conflicts,
    validate_log_policy,
    validate_region_patterns,
)


@dataclass(frozen=True)
class FakeAgent:
    id: str = "ag_1"
    queues: tuple[str, ...] = ("default", "eu_pii")
    region: str = "eu-west-1"
    state: str = "active"
    name: str = "n"


EU_ONLY = QueuePolicy(queue="eu_pii", regions=("eu-*",), logs=LOGS_LOCAL)


@pytest.mark.parametrize(
    ("region", "patterns", "allowed"),
    [
        ("eu-west-1", None, True),
        ("eu-west-1", ("eu-west-1",), True),
        ("eu-west-1", ("eu-*",), True),
        ("eu-west-1", ("us-*", "eu-west-?"), True),
        ("us-east-1", ("eu-*",), False),
        ("EU-west-1", ("eu-*",), False),  # case-sensitive on every platform
        ("eu-west-1", ("eu-[we]*",), True),
        ("eu-central-1", ("eu-[!c]*",), False),
        ("eu-west-1", (), False),
        ("eu-west-1x", ("eu-west-1",), False),  # a pattern is the whole name, not a prefix
    ],
)
def test_region_allowed(region, patterns, allowed):
    assert region_allowed(region, patterns) is allowed


def test_validate_region_patterns_cleans_and_deduplicates():
    assert validate_region_patterns([" eu-*", "eu-west-1", "eu-*"]) == ("eu-*", "eu-west-1")


@pytest.mark.parametrize("bad", [[], [""], ["eu west"], ["eu/*"], ["eu-[west"], ["x" * 65], ["eu,us"]])
def test_validate_region_patterns_refuses(bad):
    with pytest.raises(PolicyError):
        validate_region_patterns(bad)


def test_validate_log_policy():
    assert validate_log_policy("local") == LOGS_LOCAL
    with pytest.raises(PolicyError, match="hosted or local"):
        validate_log_policy("remote")


def test_may_lease_explains_each_refusal():
    agent = FakeAgent()
    assert may_lease(agent, "eu_pii", EU_ONLY) == (True, "allowed")
    assert may_lease(agent, "default", None) == (True, "allowed")
    ok, reason = may_lease(FakeAgent(region="us-east-1"), "eu_pii", EU_ONLY)
    assert not ok and "eu-*" in reason and "us-east-1" in reason
    ok, reason = may_lease(agent, "other", None)
    assert not ok and "not granted" in reason
    ok, reason = may_lease(FakeAgent(state="draining"), "default", None)
    assert not ok and "draining" in reason


def test_servable_queues_filters_granted_queues_by_policy():
    policies = {"eu_pii": EU_ONLY}
    assert servable_queues(FakeAgent(), policies) == ("default", "eu_pii")
    assert servable_queues(FakeAgent(region="us-east-1"), policies) == ("default",)
    # A policy of a queue the agent was never granted adds nothing.
    assert servable_queues(FakeAgent(queues=("default",)), {"other": QueuePolicy("other", None)}) == ("default",)


def test_token_conflicts_name_each_contradicting_queue():
    policies = {"eu_pii": EU_ONLY, "us_only": QueuePolicy("us_only", ("us-*",))}
    assert token_conflicts(["default", "eu_pii"], "eu-west-1", policies) == []
    problems = token_conflicts(["eu_pii", "us_only", "default"], "eu-west-1", policies)
    assert len(problems) == 1 and "us_only" in problems[0] and "eu-west-1" in problems[0]


def test_excluded_agents_and_could_serve():
    eu, us = FakeAgent(id="eu"), FakeAgent(id="us", region="us-east-1")
    gone = FakeAgent(id="gone", region="us-east-1", state="revoked")
    other = FakeAgent(id="other", queues=("default",), region="us-east-1")
    assert [a.id for a in excluded_agents(EU_ONLY, [eu, us, gone, other])] == ["us"]
    assert could_serve(eu, "eu_pii", EU_ONLY)
    assert could_serve(FakeAgent(state="draining"), "eu_pii", EU_ONLY)  # may be resumed
    assert not could_serve(us, "eu_pii", EU_ONLY)
    assert not could_serve(gone, "default", None)


def test_log_policy_defaults_to_hosted():
    assert log_policy(None) == LOGS_HOSTED
    assert log_policy(EU_ONLY) == LOGS_LOCAL
