"""The real ``airflow edge-agents ...`` commands, run as subprocesses against a temp AIRFLOW_HOME.

Checks the user-visible contract: idempotent ``ca init``, a token that parses and carries the CA
pin, one-line errors with a non-zero exit for bad input, and ``list`` output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

# Before anything imports Airflow: never let the test process touch ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from edge_agent.protocol import RegistrationToken  # noqa: E402


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__EDGE_AGENT__CA_DIR=str(home / "ca"),
    )
    return env


def edge_agents(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", "edge-agents", *args],
        env=airflow_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *, status: int, contains: str) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert contains in errors[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-home")
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    return home


@pytest.fixture(scope="module")
def ca_pin(home) -> str:
    """Hex pin of the module's CA (created by the first ``ca init``)."""
    first = json.loads(ok(edge_agents(home, "ca", "init", "--json")).stdout)
    return first["pin"].removeprefix("sha256:")


def db_rows(home: Path, sql: str) -> list[dict]:
    engine = create_engine(f"sqlite:///{home / 'airflow.db'}")
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------
# ca init
# ---------------------------------------------------------------------------------------------------


def test_ca_init_is_idempotent(tmp_path):
    first = ok(edge_agents(tmp_path, "ca", "init"))
    assert "created" in first.stdout.splitlines()[-1]
    assert str(tmp_path / "ca") in first.stdout

    second = ok(edge_agents(tmp_path, "ca", "init"))
    assert second.stdout.splitlines()[-1] == "already present"

    pins = [line for proc in (first, second) for line in proc.stdout.splitlines() if line.startswith("CA pin:")]
    assert len(pins) == 2 and pins[0] == pins[1]
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0

    as_json = json.loads(ok(edge_agents(tmp_path, "ca", "init", "--json")).stdout)
    assert as_json == {"ca_dir": str(tmp_path / "ca"), "pin": pins[0].split()[-1], "created": False}


# ---------------------------------------------------------------------------------------------------
# token create
# ---------------------------------------------------------------------------------------------------


def test_token_create_json_carries_the_ca_pin(home, ca_pin):
    before = datetime.now(timezone.utc)
    proc = ok(
        edge_agents(
            home, "token", "create", "--queue", "eu_pii", "--queue", "default", "--region", "eu-west-1",
            "--ttl", "15m", "--uses", "3", "--name", "fra-vm-1", "--json",
        )
    )
    out = json.loads(proc.stdout)

    token = RegistrationToken.parse(out["token"])
    assert token.ca_pin.hex() == ca_pin
    assert out["token_id"] == token.token_id
    assert out["queues"] == ["eu_pii", "default"]
    assert out["region"] == "eu-west-1"
    assert out["uses"] == 3
    assert out["name"] == "fra-vm-1"
    expires = datetime.fromisoformat(out["expires_at"])
    assert before + timedelta(minutes=14) < expires < before + timedelta(minutes=16)

    # Stored as a hash only; the secret appears nowhere but in the printed token.
    [row] = db_rows(home, f"SELECT * FROM edge_agent_token WHERE id = '{token.token_id}'")
    assert row["secret_hash"] == hashlib.sha256(token.secret.encode()).hexdigest()
    assert token.secret not in json.dumps(row, default=str)
    assert token.secret not in proc.stderr
    assert (row["max_uses"], row["uses"], row["region"]) == (3, 0, "eu-west-1")

    # Minting a credential shows in Airflow's audit log, as Airflow's own commands do.
    assert "cli_token_create" in [r["event"] for r in db_rows(home, "SELECT event FROM log")]


def test_token_create_text_prints_only_the_token_on_stdout(home, ca_pin):
    proc = ok(edge_agents(home, "token", "create", "-q", "default", "-r", "us-east-1"))
    [line] = proc.stdout.splitlines()  # TOKEN=$(airflow edge-agents token create ...) just works
    token = RegistrationToken.parse(line)
    assert token.ca_pin.hex() == ca_pin
    assert token.secret not in proc.stderr
    assert "expires" in proc.stderr


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["--region", "eu-west-1"], "at least one --queue"),
        (["-q", "default", "-r", "eu", "--ttl", "10 minutes"], "invalid --ttl"),
        (["-q", "default", "-r", "eu", "--ttl", "2d"], "at most 24h"),
        (["-q", "default", "-r", "eu", "--uses", "0"], "at least 1"),
    ],
)
def test_token_create_refuses_bad_input_in_one_line(home, ca_pin, args, contains):
    assert_one_line_error(edge_agents(home, "token", "create", *args), status=2, contains=contains)


# Every other validation branch, in-process (each `airflow` subprocess costs seconds).


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
    ],
)
def test_parse_ttl_accepts(text, expected):
    from executor_plugin.cli import parse_ttl

    assert parse_ttl(text) == expected


@pytest.mark.parametrize(
    ("call", "contains"),
    [
        (lambda cli: cli.parse_ttl("10 minutes"), "invalid --ttl"),
        (lambda cli: cli.parse_ttl("1w"), "invalid --ttl"),
        (lambda cli: cli.parse_ttl("25h"), "at most 24h"),
        (lambda cli: cli.parse_ttl("0s"), "longer than zero"),
        (lambda cli: cli.validate_queues([]), "at least one --queue"),
        (lambda cli: cli.validate_queues(["ok", "bad queue"]), "invalid queue 'bad queue'"),
        (lambda cli: cli.validate_queues(["-leading-dash"]), "invalid queue"),
        (lambda cli: cli.validate_queues(["q" * 257]), "invalid queue"),
        (lambda cli: cli.validate_region(None), "--region"),
        (lambda cli: cli.validate_region("eu/west"), "invalid region"),
        (lambda cli: cli.validate_uses(0), "at least 1"),
        (lambda cli: cli.validate_name("x" * 201), "--name"),
        (lambda cli: cli.validate_name("tab\there"), "--name"),
    ],
)
def test_validation_refuses(call, contains):
    from executor_plugin import cli

    with pytest.raises(cli.UsageError, match=re.escape(contains)):
        call(cli)


def test_validate_queues_drops_repeats_in_order():
    from executor_plugin.cli import validate_queues

    assert validate_queues(["b", "a", "b"]) == ["b", "a"]


def test_token_create_without_a_ca_points_at_ca_init(home, tmp_path):
    env_home = tmp_path  # same database, no CA in this home's ca dir
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "edge-agents", "token", "create", "-q", "default", "-r", "eu"],
        env={**airflow_env(env_home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"},
        cwd=env_home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc, status=1, contains="airflow edge-agents ca init")


def test_token_create_without_tables_says_so(tmp_path):
    ok(edge_agents(tmp_path, "ca", "init"))  # a CA, but `airflow db migrate` never ran
    proc = edge_agents(tmp_path, "token", "create", "-q", "default", "-r", "eu")
    assert_one_line_error(proc, status=1, contains="airflow db migrate")


# ---------------------------------------------------------------------------------------------------
# list, gateway
# ---------------------------------------------------------------------------------------------------


def test_list_is_empty_before_any_registration(tmp_path):
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    assert json.loads(ok(edge_agents(tmp_path, "list", "--json")).stdout) == []
    assert "No agents registered" in ok(edge_agents(tmp_path, "list")).stdout


def test_list_shows_registered_agents(home, ca_pin):
    from executor_plugin import store

    engine = create_engine(f"sqlite:///{home / 'airflow.db'}")
    try:
        with Session(engine) as session:
            token = store.create_token(
                session, token_id="listtok", secret_hash=store.hash_secret("s"), queues=["default"],
                region="eu-west-1", name=None, ttl=timedelta(hours=1), max_uses=1,
            )
            store.create_agent(session, agent_id="agent-list-1", name="fra-vm-1", token=token, pubkey_fp="fp")
            store.record_heartbeat(
                session, "agent-list-1", free_slots=3, total_slots=4, version="0.1.0", cert_not_after=None,
                running=[], lease_ttl=timedelta(minutes=1),
            )
            session.commit()
    finally:
        engine.dispose()

    rows = json.loads(ok(edge_agents(home, "list", "--json")).stdout)
    [agent] = [r for r in rows if r["id"] == "agent-list-1"]
    assert agent["name"] == "fra-vm-1"
    assert agent["queues"] == ["default"]
    assert agent["region"] == "eu-west-1"
    assert agent["state"] == "active"
    assert (agent["slots_free"], agent["slots_total"], agent["running_jobs"]) == (3, 4, 0)
    assert agent["version"] == "0.1.0"
    assert agent["last_heartbeat"] is not None

    table = ok(edge_agents(home, "list")).stdout
    assert "agent-list-1" in table and "3/4" in table


def test_gateway_refuses_a_bad_port(home):
    assert_one_line_error(edge_agents(home, "gateway", "--port", "70000"), status=2, contains="--port")


def test_nested_commands_have_help(home):
    assert "--queue" in ok(edge_agents(home, "token", "create", "--help")).stdout
