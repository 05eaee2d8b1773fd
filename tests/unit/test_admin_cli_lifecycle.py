"""The real ``airflow edge-agents`` commands of issue 3, as subprocesses against a temp AIRFLOW_HOME:
queue policies, token scope against policies, revoke, drain/resume, CA rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

# The same subprocess helpers as the issue-2 admin commands' tests (tests/unit is on sys.path).
from test_admin_cli import airflow_env, edge_agents, ok  # noqa: E402


def one_line_error(proc: subprocess.CompletedProcess[str], contains: str, status: int = 2) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and contains in errors[0], proc.stderr
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-home")
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home), cwd=home, capture_output=True, text=True, timeout=600,
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    ok(edge_agents(home, "ca", "init"))
    return home


class DB:
    def __init__(self, home: Path) -> None:
        self.engine = create_engine(f"sqlite:///{home / 'airflow.db'}")

    def __enter__(self) -> Session:
        self.session = Session(self.engine)
        return self.session

    def __exit__(self, *exc) -> None:
        self.session.commit()
        self.session.close()
        self.engine.dispose()


def add_agent(home: Path, agent_id: str, queues=("default",), region="eu-west-1", issuer: str | None = None):
    from executor_plugin import store

    with DB(home) as s:
        token = store.create_token(
            s, token_id=f"t{agent_id}"[:32], secret_hash=store.hash_secret("s"), queues=queues, region=region,
            name=None, ttl=timedelta(hours=1), max_uses=1,
        )
        store.create_agent(s, agent_id=agent_id, name=agent_id, token=token, pubkey_fp=agent_id)
        store.set_agent_cert(s, agent_id, serial="01", not_after=store.utcnow() + timedelta(hours=1), issuer=issuer)


def test_queue_set_list_delete_and_the_agents_a_policy_excludes(home):
    add_agent(home, "ag_us", queues=("eu_pii",), region="us-east-1")
    out = json.loads(ok(edge_agents(home, "queue", "set", "eu_pii", "--regions", "eu-west-1,eu-*", "--json")).stdout)
    assert out["regions"] == ["eu-west-1", "eu-*"] and out["logs"] == "hosted"
    assert out["excluded_agents"] == [{"id": "ag_us", "region": "us-east-1"}]
    text = ok(edge_agents(home, "queue", "set", "eu_pii", "--logs", "local")).stdout
    assert "regions eu-west-1, eu-*; logs local" in text and "excludes agent ag_us" in text
    listed = json.loads(ok(edge_agents(home, "queue", "list", "--json")).stdout)
    assert [(p["queue"], p["regions"], p["logs"]) for p in listed] == [("eu_pii", ["eu-west-1", "eu-*"], "local")]
    assert "eu_pii" in ok(edge_agents(home, "queue", "list")).stdout

    one_line_error(edge_agents(home, "queue", "set", "eu_pii", "--regions", "eu west"), "--regions")
    one_line_error(edge_agents(home, "queue", "set", "eu_pii"), "--regions and/or --logs")
    one_line_error(edge_agents(home, "queue", "set", "eu_pii", "--logs", "remote"), "hosted or local")

    # A token whose region the policy does not admit is refused at minting.
    one_line_error(
        edge_agents(home, "token", "create", "-q", "default", "-q", "eu_pii", "-r", "us-east-1"),
        "queue 'eu_pii' may only run in regions eu-west-1, eu-*, not us-east-1",
    )
    ok(edge_agents(home, "token", "create", "-q", "eu_pii", "-r", "eu-central-1"))

    ok(edge_agents(home, "queue", "delete", "eu_pii"))
    one_line_error(edge_agents(home, "queue", "delete", "eu_pii"), "has no policy")
    assert json.loads(ok(edge_agents(home, "queue", "list", "--json")).stdout) == []


def test_revoke_drain_resume(home):
    from executor_plugin import store

    add_agent(home, "ag_life", queues=("life",))
    with DB(home) as s:
        store.enqueue_job(
            s, workload_json="{}", ti_id="00000000-0000-0000-0000-0000000000ff", dag_id="d", task_id="t",
            run_id="r", map_index=-1, try_number=1, queue="life", priority_weight=1,
        )
    with DB(home) as s:
        assert store.lease_next(s, store.get_agent(s, "ag_life"), lease_ttl=timedelta(minutes=5)) is not None

    assert json.loads(ok(edge_agents(home, "drain", "ag_life", "--json")).stdout)["state"] == "draining"
    assert "active again" in ok(edge_agents(home, "resume", "ag_life")).stdout
    revoked = json.loads(ok(edge_agents(home, "revoke", "ag_life", "--json")).stdout)
    assert (revoked["state"], revoked["requeued_jobs"], revoked["running_jobs"]) == ("revoked", 1, [])
    [row] = [a for a in json.loads(ok(edge_agents(home, "list", "--json")).stdout) if a["id"] == "ag_life"]
    assert row["state"] == "revoked"
    one_line_error(edge_agents(home, "resume", "ag_life"), "revoked")
    one_line_error(edge_agents(home, "revoke", "ag_nobody"), "no agent 'ag_nobody'")


def test_ca_rotate_list_and_retire_old(home):
    pin = json.loads(ok(edge_agents(home, "ca", "init", "--json")).stdout)["pin"].removeprefix("sha256:")
    add_agent(home, "ag_oldca", issuer=pin)
    rotated = json.loads(ok(edge_agents(home, "ca", "rotate", "--json")).stdout)
    assert rotated["previous_pin"] == f"sha256:{pin}" and rotated["pin"] != rotated["previous_pin"]
    one_line_error(edge_agents(home, "ca", "rotate"), "retire-old", status=1)

    [row] = [a for a in json.loads(ok(edge_agents(home, "list", "--json")).stdout) if a["id"] == "ag_oldca"]
    assert (row["cert_ca"], row["cert_issuer"], row["cert_serial"]) == ("old", pin, "01")
    one_line_error(edge_agents(home, "ca", "retire-old"), "ag_oldca")
    retired = json.loads(ok(edge_agents(home, "ca", "retire-old", "--force", "--json")).stdout)
    assert retired["retired"] == [f"sha256:{pin}"] and "ag_oldca" in retired["agents_cut_off"]
    assert "nothing to retire" in ok(edge_agents(home, "ca", "retire-old")).stdout
    # Tokens minted now carry the new pin.
    from edge_agent.protocol import RegistrationToken

    token = RegistrationToken.parse(ok(edge_agents(home, "token", "create", "-q", "x", "-r", "eu")).stdout.strip())
    assert f"sha256:{token.ca_pin.hex()}" == rotated["pin"]
