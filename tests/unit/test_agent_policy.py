"""The agent's local policy (``edge_agent.policy``): file format (a malformed file is an error naming
file and key) and ``decide``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import AgentConfig
from edge_agent.errors import PolicyError
from edge_agent.policy import Policy, decide, facts, load_policy
from edge_agent.protocol import Lease


def lease(*, dag_id: str = "finance_daily", queue: str = "finance", bundle: str | None = "dags-folder",
          ti: dict[str, Any] | None = None) -> Lease:
    workload: dict[str, Any] = {
        "ti": ti if ti is not None else {"dag_id": dag_id, "task_id": "t", "run_id": "r", "try_number": 1,
                                         "map_index": -1, "queue": queue},
        "token": "jwt",
    }
    if bundle is not None:
        workload["bundle_info"] = {"name": bundle, "version": None}
    return Lease(job_id="j1", fencing=1, queue=queue, dag_id=dag_id, task_id="t", run_id="r", map_index=-1,
                 try_number=1, workload=workload, lease_expires_at=datetime.now(timezone.utc))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


# -- loading -------------------------------------------------------------------------------------


def test_no_file_at_the_default_path_means_no_narrowing(tmp_path: Path) -> None:
    config = AgentConfig.build(state_dir=tmp_path, env={})
    assert config.policy_file == tmp_path / "policy.toml" and not config.policy_required
    policy = load_policy(config.policy_file, required=config.policy_required)
    assert not policy.narrows
    assert decide(policy, lease(dag_id="anything")).accepted


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    config = AgentConfig.build(state_dir=tmp_path, env={"EDGE_AGENT_POLICY": str(tmp_path / "nope.toml")})
    assert config.policy_required
    with pytest.raises(PolicyError, match=r"policy file .*nope.toml does not exist"):
        load_policy(config.policy_file, required=config.policy_required)


def test_option_beats_env(tmp_path: Path) -> None:
    config = AgentConfig.build(state_dir=tmp_path, policy=tmp_path / "a.toml", env={"EDGE_AGENT_POLICY": "/b.toml"})
    assert config.policy_file == tmp_path / "a.toml" and config.policy_required


def test_a_full_policy(tmp_path: Path) -> None:
    path = write(tmp_path, 'allowed_dags = ["finance_*", "reporting"]\nallowed_bundles = ["dags-folder"]\n'
                           'allowed_queues = ["fin*"]\n')
    policy = load_policy(path, required=True)
    assert policy == Policy(source=path, allowed_dags=("finance_*", "reporting"), allowed_bundles=("dags-folder",),
                            allowed_queues=("fin*",))
    assert "finance_*" in policy.describe() and str(path) in policy.describe()


@pytest.mark.parametrize(("text", "needle"), [
    ('allowed_dags = ["a"', "is not valid TOML"),
    ('allowed_dag = ["a"]', "unknown key 'allowed_dag'"),  # a typo must never read as "allow everything"
    ('allowed_dags = "finance_*"', "key 'allowed_dags' must be a list of patterns, got str"),
    ('allowed_queues = [1]', "key 'allowed_queues' holds 1"),
    ('allowed_bundles = [""]', "key 'allowed_bundles' holds ''"),
    ('[allowed_dags]\nx = 1', "key 'allowed_dags' must be a list of patterns, got dict"),
])
def test_malformed_file_is_one_line_naming_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, required=False)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_unreadable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(path, required=False)


# -- deciding ------------------------------------------------------------------------------------


def test_dag_patterns(tmp_path: Path) -> None:
    policy = Policy(source=tmp_path / "p.toml", allowed_dags=("finance_*",))
    assert decide(policy, lease(dag_id="finance_daily")).accepted
    refused = decide(policy, lease(dag_id="hr_payroll"))
    assert not refused.accepted
    assert refused.reason == f"dag 'hr_payroll' not in allowed_dags of {tmp_path / 'p.toml'}"
    assert not decide(policy, lease(dag_id="Finance_daily")).accepted  # case-sensitive, like DAG ids


def test_queue_and_bundle(tmp_path: Path) -> None:
    policy = Policy(source=tmp_path / "p.toml", allowed_queues=("finance",), allowed_bundles=("git-*",))
    assert decide(policy, lease(bundle="git-finance")).accepted
    assert decide(policy, lease(bundle="dags-folder")).reason.startswith("bundle 'dags-folder' not in allowed_bundles")
    assert decide(policy, lease(queue="other", bundle="git-x")).reason.startswith("queue 'other' not in allowed_queues")
    assert "names no bundle" in decide(policy, lease(bundle=None)).reason


def test_empty_list_allows_nothing(tmp_path: Path) -> None:
    assert not decide(Policy(source=tmp_path / "p.toml", allowed_dags=()), lease()).accepted


def test_decides_on_what_the_workload_runs(tmp_path: Path) -> None:
    # A lease that names an allowed DAG while its workload runs another is refused, policy or not.
    sneaky = lease(dag_id="finance_daily", ti={"dag_id": "hr_payroll", "task_id": "t", "run_id": "r",
                                                "try_number": 1, "map_index": -1})
    for policy in (Policy(), Policy(source=tmp_path / "p.toml", allowed_dags=("finance_*",))):
        decision = decide(policy, sneaky)
        assert not decision.accepted
        assert decision.reason == ("inconsistent lease: the lease names dag_id 'finance_daily' but its workload "
                                   "runs dag_id 'hr_payroll'")
    job, mismatch = facts(sneaky)
    assert job.dag_id == "hr_payroll" and mismatch


def test_workload_without_ti_fields_uses_the_lease() -> None:
    job, mismatch = facts(lease(ti={}))
    assert mismatch is None and job.dag_id == "finance_daily" and job.bundle == "dags-folder"
