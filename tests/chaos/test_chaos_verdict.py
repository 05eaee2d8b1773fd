"""The chaos checks and the report on made-up evidence: each witness disagreement is caught, and only that.

No stack here (these run in a second); the evidence is built the way ``ChaosStack.evidence`` returns
it: one healthy run, then one change per test.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chaos_harness import Stopwatch
from chaos_verdict import Expectation, duplicates, explain, judge

# Loaded from its path: a top-level module named "report" would be anybody's.
_spec = importlib.util.spec_from_file_location("chaos_report", Path(__file__).with_name("report.py"))
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

AGENTS = {"id-a": "chaos-a", "id-b": "chaos-b"}
RUN = "manual__1"


@dataclass
class Ev:
    run_state: str = "success"
    tis: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"chaos-a": [], "chaos-b": []})
    agent_names: dict[str, str] = field(default_factory=lambda: dict(AGENTS))
    run_id: str = RUN

    def ran(self, task: str, try_number: int, agent: str, *, exit_code: int | None = 0, job_state: str = "success",
            ended: bool = True, audit_finish: bool = True, fencing: int = 1) -> str:
        """One try: its ledger lines, audit entries and job row."""
        job_id = f"job-{task}-{try_number}"
        agent_id = next(i for i, n in AGENTS.items() if n == agent)
        ti = {"task_id": task, "map_index": -1, "try_number": try_number, "run_id": RUN, "dag_id": "chaos"}
        self.ledger.append({"ev": "start", "task": task, "map": -1, "try": try_number, "agent": agent, "run": RUN})
        if ended:
            self.ledger.append({"ev": "end", "task": task, "map": -1, "try": try_number, "agent": agent, "run": RUN})
        entries = self.audit[agent]
        entries.append({"event": "decision", "decision": "accepted", "job_id": job_id, "fencing": fencing, "ti": ti})
        entries.append({"event": "start", "job_id": job_id, "fencing": fencing, "ti": ti, "pid": 1})
        entries.append({"event": "run", "job_id": job_id, "fencing": fencing, "ti": ti})
        if audit_finish:
            entries.append({"event": "finish", "job_id": job_id, "fencing": fencing, "ti": ti, "exit_code": exit_code})
        self.jobs.append({"id": job_id, "task_id": task, "map_index": -1, "try_number": try_number, "state": job_state,
                          "agent_id": agent_id, "fencing": fencing, "exit_code": exit_code, "reason": None})
        return job_id


def healthy(n: int = 4) -> Ev:
    ev = Ev()
    for i in range(n):
        task = f"t{i:03d}"
        ev.tis.append({"task_id": task, "map_index": -1, "try_number": 1, "state": "success"})
        ev.ran(task, 1, "chaos-a" if i % 2 else "chaos-b")
    return ev


def retried(ev: Ev, task: str = "t000") -> None:
    """t000's first try died with agent A (no end, no finish, job closed by the hosted side); try 2 on B."""
    ev.ledger = [r for r in ev.ledger if r["task"] != task]
    ev.jobs = [j for j in ev.jobs if j["task_id"] != task]
    for agent in ev.audit:
        ev.audit[agent] = [e for e in ev.audit[agent] if e["ti"]["task_id"] != task]
    ev.ran(task, 1, "chaos-a", ended=False, audit_finish=False, exit_code=None, job_state="failed")
    ev.ran(task, 2, "chaos-b")
    ev.history.append({"task_id": task, "map_index": -1, "try_number": 1, "state": "failed"})
    next(t for t in ev.tis if t["task_id"] == task)["try_number"] = 2


def test_a_healthy_run_has_no_problems() -> None:
    v = judge(healthy(), Expectation())
    assert v.problems == []
    assert v.counts["tasks"] == 4 and v.counts["tries_run"] == 4 and v.counts["tasks_lost"] == 0
    assert duplicates(v) == 0 and v.counts["reports_lost"] == 0


def test_a_retry_the_fault_explains_is_fine_and_any_other_is_not() -> None:
    ev = healthy()
    retried(ev)
    ok = judge(ev, Expectation(may_fail=frozenset({("t000", -1, 1)})))
    assert ok.problems == []
    assert ok.counts["failed_tries"] == 1 and ok.counts["retried_tasks"] == 1
    bad = judge(ev, Expectation())
    assert any("no business failing" in p and "t000#1" in p for p in bad.problems)


def test_a_try_started_twice_is_a_duplicate_in_the_ledger_and_the_audit() -> None:
    ev = healthy()
    ev.ledger.append({"ev": "start", "task": "t001", "map": -1, "try": 1, "agent": "chaos-b", "run": RUN})
    ti = {"task_id": "t001", "map_index": -1, "try_number": 1, "run_id": RUN}
    ev.audit["chaos-b"].append({"event": "start", "job_id": "job-t001-1", "fencing": 2, "ti": ti})
    ev.audit["chaos-b"].append({"event": "run", "job_id": "job-t001-1", "fencing": 2, "ti": ti})
    v = judge(ev, Expectation())
    assert any("started more than once (ledger)" in p for p in v.problems)
    assert any("more than one run of a try" in p for p in v.problems)
    assert duplicates(v) == 1
    assert ("t001", -1, 1) in v.suspects
    assert "ledger:" in explain(ev, v.suspects)


def test_missing_audit_run_events_are_one_problem_not_hundreds() -> None:
    ev = healthy()
    for agent in ev.audit:
        ev.audit[agent] = [e for e in ev.audit[agent] if e["event"] != "run"]
    v = judge(ev, Expectation())
    assert [p for p in v.problems if "audit" in p] == [
        "no agent audit log has a 'run' event: the audit cannot show which tries ran (4 tries ran per the ledger)"
    ]


def test_a_supervisor_forked_on_a_cut_off_agent_is_not_a_duplicate_run() -> None:
    # Agent A forked the supervisor of t001#1, then lost its lease (requeued); B ran the try.
    ev = healthy()
    ti = {"task_id": "t001", "map_index": -1, "try_number": 1, "run_id": RUN}
    ev.audit["chaos-a"].append({"event": "start", "job_id": "job-t001-1", "fencing": 1, "ti": ti, "pid": 7})
    v = judge(ev, Expectation())
    assert v.problems == [] and duplicates(v) == 0
    assert v.counts["audit_starts"] == 5 and v.counts["audit_runs"] == 4 and v.counts["audit_starts_not_run"] == 1


def test_a_run_without_its_start_in_the_same_audit_log_is_a_problem() -> None:
    ev = healthy()
    ev.audit["chaos-a"] = [e for e in ev.audit["chaos-a"] if e["event"] != "start"]
    v = judge(ev, Expectation())
    assert any("'run' but no 'start'" in p for p in v.problems)


def test_an_open_job_row_is_a_lost_report() -> None:
    ev = healthy()
    ev.jobs[0].update(state="running", exit_code=None)
    v = judge(ev, Expectation())
    assert any("job rows left open" in p for p in v.problems)
    assert v.counts["reports_lost"] >= 1


def test_an_exit_code_the_agent_did_not_report_is_caught() -> None:
    ev = healthy()
    ev.jobs[1]["exit_code"] = 1
    v = judge(ev, Expectation())
    assert any("differs from the agent's audit 'finish'" in p for p in v.problems)


def test_a_late_report_for_a_try_airflow_already_failed_is_not_lost() -> None:
    ev = healthy()
    retried(ev)
    # The partitioned agent finished try 1 after all, but the hosted side had closed the job.
    ev.audit["chaos-a"].append({"event": "finish", "job_id": "job-t000-1", "fencing": 1, "exit_code": 0,
                                "ti": {"task_id": "t000", "map_index": -1, "try_number": 1, "run_id": RUN}})
    v = judge(ev, Expectation(may_fail=frozenset({("t000", -1, 1)})))
    assert v.problems == []
    assert v.counts["late_reports_refused"] == 1


def test_a_job_closed_by_the_hosted_side_must_say_what_airflow_says() -> None:
    ev = healthy()
    # Closed as success while its agent was away (Airflow got the task's own success): the late
    # report of exit 0 is refused, by design.
    ev.jobs[1].update(exit_code=None, fencing=2)
    v = judge(ev, Expectation())
    assert v.problems == []
    assert v.counts["late_reports_refused"] == 1 and v.counts["closed_by_hosted_side"] == 1
    # Closed as failed while Airflow counted the try a success: the report was lost.
    ev.jobs[2].update(exit_code=None, state="failed", fencing=2)
    v = judge(ev, Expectation())
    assert any("closed without the agent's report in a state Airflow's try does not have" in p for p in v.problems)
    assert v.counts["reports_lost"] == 1


def test_a_finish_for_a_job_that_has_no_row_is_lost() -> None:
    ev = healthy()
    ev.jobs.pop(0)
    v = judge(ev, Expectation())
    assert any("'finish' reports for jobs that have no row" in p for p in v.problems)


def test_unfinished_tasks_and_history_gaps_are_reported() -> None:
    ev = healthy()
    ev.run_state = "failed"
    ev.tis[3].update(state="failed", try_number=2)
    v = judge(ev, Expectation())
    assert any("ended 'failed'" in p for p in v.problems)
    assert any("not in state success" in p for p in v.problems)
    assert any("history does not hold" in p and "t003#1" in p for p in v.problems)
    assert v.counts["tasks_lost"] == 1


def test_a_try_that_failed_before_it_ran_may_be_missing_from_the_history() -> None:
    # Airflow 3.3 archives only tries that failed RUNNING; this one failed QUEUED (its agent was
    # killed after starting the supervisor, before Airflow's /run): no ledger line, job failed.
    ev = healthy()
    retried(ev)
    ev.history.clear()
    ev.ledger = [r for r in ev.ledger if (r["task"], r["try"]) != ("t000", 1)]
    may_fail = Expectation(may_fail=frozenset({("t000", -1, 1)}))
    v = judge(ev, may_fail)
    assert v.problems == []
    assert v.counts["failed_tries"] == 1 and v.counts["failed_unarchived"] == 1
    # ... but it still counts as a failure the fault must explain,
    assert any("no business failing" in p for p in judge(ev, Expectation()).problems)
    # and a try that ran (ledger) must be in the history.
    ev.ledger.append({"ev": "start", "task": "t000", "map": -1, "try": 1, "agent": "chaos-a", "run": RUN})
    assert any("history does not hold" in p and "t000#1" in p for p in judge(ev, may_fail).problems)


def test_report_renders_a_row_per_test_and_the_timings(tmp_path: Path) -> None:
    base = {"tasks": 200, "tries_run": 205, "failed_tries": 5, "allowed_failures": 6, "faults_injected": 1,
            "tasks_lost": 0, "duplicates": 0, "reports_lost": 0, "config": {"cpus": 2}, "recorded_at": "2026-01-02T03:04:05"}
    (tmp_path / "agent_kill.json").write_text(json.dumps(
        {**base, "test": "agent_kill", "title": "Agent killed", "fault": "kill -9", "passed": True,
         "figures": {"detection_s": 17.25, "requeue_s": None, "leased_at_fault": 2}}))
    (tmp_path / "gateway_kill.json").write_text(json.dumps(
        {**base, "test": "gateway_kill", "title": "Gateway killed", "fault": "kill -9 gw", "passed": False,
         "problems": ["tries failed that the fault had no business failing: 1 try: t000#1\nmore"], "figures": {}}))
    text = report.render(report.load(tmp_path))
    lines = text.splitlines()
    assert lines[2].startswith("| Gateway killed |") and lines[3].startswith("| Agent killed |")
    assert "| 5 (6) |" in lines[3] and lines[3].endswith("| pass |") and lines[2].endswith("| FAIL |")
    assert "| **Total** | | 400 | 410 | 10 | 2 | 0 | 0 | 0 | 1/2 pass |" in text
    assert "| 17.2 s |" in text or "| 17.3 s |" in text
    assert "not seen" in text
    assert "* Gateway killed: tries failed that the fault had no business failing: 1 try: t000#1" in text
    assert report.render([]).startswith("No chaos figures")


def test_stopwatch_measures_until_the_condition_holds() -> None:
    flag = threading.Event()
    sw = Stopwatch("flag", flag.is_set, every=0.05, timeout=30)
    assert sw.seconds is None
    flag.set()
    assert sw.wait(30) is not None
    never = Stopwatch("never", lambda: False, every=0.05, timeout=0.2)
    assert never.wait(30) is None


@pytest.mark.parametrize(("value", "text"), [(None, "–"), (3, "3"), (2.5, "2.5")])
def test_report_numbers(value: Any, text: str) -> None:
    assert report._num(value) == text
