"""The local-logs notice: written next to where a shipped log would be, and read by Airflow's own reader.

Airflow's ``FileTaskHandler`` (the api-server's task log reader) is run on the folder to prove the
notice shows up in the task's log view, alone (logs kept local) or next to a shipped log.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="edge-agent-unit-airflow-")

from executor_plugin.ui.log_notice import (  # noqa: E402
    NOTICE_SUFFIX,
    local_log_notice,
    notice_line,
    notice_path,
    write_local_log_notice,
)

LOG_PATH = "dag_id=d/run_id=r/task_id=t/attempt=1.log"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def read_like_airflow(base: Path, log_path: str) -> tuple[list[str], list[str]]:
    """(sources, events) as Airflow's file task handler reads the local log of ``log_path``."""
    from airflow.utils.log.file_task_handler import FileTaskHandler, _interleave_logs

    handler = FileTaskHandler(base_log_folder=str(base))
    sources, streams = handler._read_from_local(Path(base, log_path))
    return sources, [message.event for message in _interleave_logs(*streams)]


def test_the_notice_names_the_agent_and_the_path_in_its_log_folder():
    text = local_log_notice(agent_name="eu-box", agent_id="ag_1", queue="pii", log_path=LOG_PATH)
    assert "edge agent eu-box (ag_1)" in text and LOG_PATH in text and "queue 'pii' keeps task logs local" in text


def test_notice_line_is_a_task_sdk_json_line():
    line = notice_line("hello", NOW)
    assert line.endswith("\n")
    assert json.loads(line) == {"timestamp": NOW.isoformat(), "level": "info", "event": "hello", "logger": "edge_agent"}


def test_airflows_reader_shows_the_notice_when_the_log_stays_local(tmp_path):
    path = write_local_log_notice(tmp_path, log_path=LOG_PATH, agent_name="eu-box", agent_id="ag_1", queue="pii", now=NOW)
    assert path == tmp_path / f"{LOG_PATH}{NOTICE_SUFFIX}"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    sources, events = read_like_airflow(tmp_path, LOG_PATH)
    assert sources == [str(path)]
    assert events == [local_log_notice(agent_name="eu-box", agent_id="ag_1", queue="pii", log_path=LOG_PATH)]


def test_a_second_lease_replaces_the_notice_and_leaves_no_temp_file(tmp_path):
    write_local_log_notice(tmp_path, log_path=LOG_PATH, agent_name="first", agent_id="ag_1", queue="pii")
    write_local_log_notice(tmp_path, log_path=LOG_PATH, agent_name="second", agent_id="ag_2", queue="pii")
    folder = (tmp_path / LOG_PATH).parent
    assert [p.name for p in folder.iterdir()] == [f"attempt=1.log{NOTICE_SUFFIX}"]
    _, events = read_like_airflow(tmp_path, LOG_PATH)
    assert len(events) == 1 and "edge agent second (ag_2)" in events[0]


def test_the_notice_sits_beside_a_shipped_log_without_touching_it(tmp_path):
    shipped = tmp_path / LOG_PATH
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"timestamp": "2026-11-21T12:00:05+00:00", "level": "info", "event": "task said hi"}) + "\n")
    write_local_log_notice(tmp_path, log_path=LOG_PATH, agent_name="eu-box", agent_id="ag_1", queue="pii", now=NOW)
    assert shipped.read_text().count("\n") == 1  # the shipped log's byte offsets are unchanged
    _, events = read_like_airflow(tmp_path, LOG_PATH)
    assert events[0].startswith("This task's log stays") and events[1] == "task said hi"


def test_nowhere_to_write(tmp_path):
    assert write_local_log_notice(tmp_path, log_path=None, agent_name="a", agent_id="b", queue="q") is None
    assert write_local_log_notice(tmp_path, log_path="", agent_name="a", agent_id="b", queue="q") is None
    escaping = "../../outside/attempt=1.log"
    assert notice_path(tmp_path, escaping) is None
    assert write_local_log_notice(tmp_path, log_path=escaping, agent_name="a", agent_id="b", queue="q") is None
    assert not (tmp_path.parent.parent / "outside").exists()
