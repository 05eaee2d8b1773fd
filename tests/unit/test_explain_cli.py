"""``airflow edge-agents explain``: argument parsing, the text and JSON output, one-line errors.

The command is parsed by Airflow's own argparse builder (``cli_parser._add_command``) from
``cli_explain.EXPLAIN_COMMAND`` and runs in-process against a temp SQLite database that Airflow's
session factories point at; rows are written through the real store. One test runs the real
``airflow edge-agents explain`` as ``executor_plugin/cli.py`` registers it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

# Sets AIRFLOW_HOME before Airflow is imported, and provides the row builders (tests/unit is on sys.path).
from test_explain import OURS, add_task_instance, enqueue, register  # noqa: I001

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

from airflow import settings  # noqa: E402

from executor_plugin.cli_explain import EXPLAIN_COMMAND, render_text  # noqa: E402
from executor_plugin.models import metadata  # noqa: E402


@pytest.fixture
def db(tmp_path, monkeypatch):
    """Airflow's session factories bound to a SQLite file with our tables and task_instance."""
    from airflow.models import import_all_models
    from airflow.models.taskinstance import TaskInstance

    import_all_models()
    engine = create_engine(f"sqlite:///{tmp_path / 'airflow.db'}", connect_args={"check_same_thread": False})
    metadata.create_all(engine)
    TaskInstance.__table__.create(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    monkeypatch.setattr(settings, "engine", engine)
    monkeypatch.setattr(settings, "NonScopedSession", factory)
    monkeypatch.setattr(settings, "Session", scoped_session(factory))
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", OURS)
    yield factory
    settings.Session.remove()
    engine.dispose()


def run(*argv: str) -> None:
    from airflow.cli.cli_parser import _add_command

    parser = argparse.ArgumentParser(prog="airflow edge-agents")
    _add_command(parser.add_subparsers(), EXPLAIN_COMMAND)
    args = parser.parse_args(["explain", *argv])
    args.func(args)


@pytest.fixture
def stranded(db):
    """A queued task on a queue only one agent is granted; a second agent serves another queue."""
    s = db()
    register(s, "gpu-box", queues=("gpu",))
    register(s, "default-box")
    ti_id = add_task_instance(s, task_id="stranded", queue="gpu")
    enqueue(s, ti_id, queue="gpu", task_id="stranded")
    s.close()


def test_text_output_lists_every_agent_and_why(stranded, capsys):
    run("dag", "stranded", "run")
    out = capsys.readouterr().out
    assert "task instance: dag / run / stranded, try 1, state queued, executor EdgeAgentExecutor" in out
    assert "queue:         gpu (regions any; logs hosted)" in out
    assert "job:           queued since" in out
    assert "verdict:       1 of 2 agent(s) can take it now: gpu-box" in out
    lines = out.splitlines()
    assert any(line.startswith("CAN      gpu-box") for line in lines)
    cannot = next(i for i, line in enumerate(lines) if line.startswith("CANNOT   default-box"))
    assert "queue_not_served: queue 'gpu' is not granted to it (its queues: default)" in lines[cannot + 1]


def test_json_output(stranded, capsys):
    run("dag", "stranded", "run", "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["queue"] == "gpu" and data["job"]["state"] == "queued"
    verdicts = {v["name"]: v for v in data["agents"]}
    assert verdicts["gpu-box"]["can_take"] is True
    assert [r["code"] for r in verdicts["default-box"]["reasons"]] == ["queue_not_served"]


def test_unknown_task_is_one_line_usage_error(db, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("dag", "nope", "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no task instance dag/run/nope") and "Traceback" not in err


@pytest.mark.parametrize(("option", "value", "message"), [("--map-index", "x", "--map-index must be a whole number"),
                                                           ("--try", "0", "--try must be at least 1")])
def test_bad_numbers_are_usage_errors(db, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        run("dag", "task", "run", option, value)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_render_text_with_no_agents(db):
    from executor_plugin.explain import TaskRef, gather

    s = db()
    add_task_instance(s)
    text = render_text(gather(s, TaskRef("dag", "task", "run"), configured_executors=OURS))
    assert text.endswith("No agent is registered. Mint a token with 'airflow edge-agents token create'.")
    s.close()


def test_the_real_airflow_command_once_registered(tmp_path):
    from test_admin_cli import airflow_env

    env = airflow_env(tmp_path)
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "airflow", "edge-agents", "explain", "dag", "task", "run"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: no task instance dag/run/task" in proc.stderr
