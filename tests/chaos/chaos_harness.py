"""One chaos test's driver: trigger the run, find the moment to strike, time the recovery, judge, record.

:class:`Chaos` wraps a started :class:`chaos_stack.ChaosStack` for one test. A test triggers a
fresh run (:meth:`Chaos.trigger`), waits until the agent it will hurt is busy
(:meth:`Chaos.wait_busy`), injects its fault, starts :class:`Stopwatch` es for the figures and ends
with :meth:`Chaos.conclude`, which waits for the run to end (:meth:`Chaos.finish`), judges it against
the tries the fault may cost, writes ``build/chaos/<test>.json`` (also when the test fails) and fails
the test with every witness about the tries in question, the run's state counts, the job rows and
the tail of every log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
from chaos_stack import (
    AGENT_CONCURRENCY,
    AGENT_DEAD_AFTER,
    DAG_ID,
    RETRIES,
    TASK_HEARTBEAT_TIMEOUT,
    ChaosStack,
    Evidence,
)
from chaos_verdict import (
    Expectation,
    TryKey,
    Verdict,
    audit_key,
    duplicates,
    explain,
    judge,
    ledger_key,
)
from localstack import StackError

from edge_agent.fsutil import atomic_write

ROOT = Path(__file__).resolve().parents[2]
FIGURES_DIR = ROOT / "build" / "chaos"

#: Bounds on hangs, not expectations: a 200-task run takes about two minutes here.
RUN_TIMEOUT = 480.0
#: After the run ends: job rows closing, spools draining (a healed agent replays its reports).
SETTLE_TIMEOUT = 90.0
BUSY_TIMEOUT = 180.0
#: What :meth:`Chaos.offline_in_list` returns when the list has no ``online``/``status`` field.
MISSING = "field missing"
#: What a watch for more work of the run returns once the run has ended without it.
RUN_OVER = "the run ended first"


def after(moment: datetime | None, since: datetime) -> bool:
    return moment is not None and moment > since


class Stopwatch:
    """Seconds from ``t0`` until ``check()`` first returns true, measured by a background thread.

    ``every`` is the pause between checks and so the resolution of the figure (a CLI check takes
    seconds by itself: its figure is an upper bound). A check that raises counts as false; the last
    error is kept for the record.
    """

    def __init__(
        self, what: str, check: Callable[[], object], *, every: float = 0.5, timeout: float = 300.0,
        t0: float | None = None,
    ) -> None:
        self.what = what
        self.check = check
        self.every = every
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline = self.t0 + timeout
        self.seconds: float | None = None
        self.value: object = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stopwatch: {what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    value = self.check()
                except Exception as exc:  # noqa: BLE001 - a failing probe must not end the measurement
                    value, self.error = None, f"{type(exc).__name__}: {exc}"[:300]
                if value:
                    self.seconds, self.value = round(time.monotonic() - self.t0, 2), value
                    return
                if time.monotonic() >= self.deadline:
                    return
                self._stop.wait(self.every)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> float | None:
        """Block until the condition held, the watch timed out, or ``timeout``; the figure or None."""
        self._done.wait(timeout)
        return self.seconds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Chaos:
    """The driver of one chaos test (a fixture hands a fresh one to each test)."""

    def __init__(self, stack: ChaosStack, test: str, title: str, fault: str) -> None:
        self.stack = stack
        self.test = test
        self.title = title
        self.fault_text = fault
        self.faults = 0
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.extra_problems: list[str] = []
        self.run_id: str | None = None
        self._watches: list[Stopwatch] = []

    # ---- the run --------------------------------------------------------------------------------

    def trigger(self) -> str:
        self.run_id = self.stack.trigger(DAG_ID)
        return self.run_id

    def run_over(self) -> bool:
        """The run has ended (a watch for more of its work can stop: none will come)."""
        assert self.run_id
        return self.stack.run_duration(self.run_id) is not None

    def in_flight(self, agent: str) -> set[TryKey]:
        """Tries whose code started on ``agent`` and has not ended (per the ledger)."""
        assert self.run_id
        started: set[TryKey] = set()
        ended: set[TryKey] = set()
        for row in self.stack.ledger_lines(self.run_id):
            if row.get("agent") == agent:
                (started if row["ev"] == "start" else ended).add(ledger_key(row))
        return started - ended

    def started_count(self) -> int:
        assert self.run_id
        return sum(1 for r in self.stack.ledger_lines(self.run_id) if r["ev"] == "start")

    def wait_busy(self, agent: str, *, min_started: int = 30, min_in_flight: int = 2) -> set[TryKey]:
        """Wait until the run is well under way and ``agent`` runs several tries; return those tries."""

        def busy() -> set[TryKey] | None:
            if self.started_count() < min_started:
                return None
            running = self.in_flight(agent)
            return running if len(running) >= min_in_flight else None

        try:
            return self.stack.wait_until(f"{agent} to be busy with run {self.run_id}", busy, BUSY_TIMEOUT)
        except StackError as exc:
            self.fail(f"the run never got busy enough to inject the fault: {exc}")

    def open_accepted(self, agent: str, *, started: bool = False) -> set[TryKey]:
        """Tries ``agent`` accepted (audit ``decision``) and has no ``finish`` for yet: what a fault there hits.

        ``started``: only those whose supervisor started (audit ``start``), i.e. not a lease still
        waiting to start (the gateway requeues those instead).
        """
        accepted: set[TryKey] = set()
        begun: set[TryKey] = set()
        finished: set[TryKey] = set()
        for entry in self.stack.audit_entries(self.stack.agent(agent)):
            if (entry.get("ti") or {}).get("run_id") != self.run_id:
                continue
            key = audit_key(entry)
            if key is None:
                continue
            if entry.get("event") == "decision" and entry.get("decision") == "accepted":
                accepted.add(key)
            elif entry.get("event") == "start":
                begun.add(key)
            elif entry.get("event") == "finish":
                finished.add(key)
        return (accepted & begun if started else accepted) - finished

    def jobs(self) -> list[dict[str, Any]]:
        assert self.run_id
        return self.stack.job_rows(self.run_id)

    def leased_to(self, agent_id: str) -> dict[str, int]:
        """Jobs of the run leased to the agent and not confirmed started: job id -> fencing."""
        return {j["id"]: j["fencing"] for j in self.jobs() if j["agent_id"] == agent_id and j["state"] == "leased"}

    def catch_leased(self, agent_id: str, agent: str, timeout: float = 30.0) -> dict[str, int]:
        """Wait for a moment when the agent runs task code and holds a lease it has not started yet.

        Returns those leases ({} if no such moment came; the caller strikes anyway). A lease turns
        into a start within a few hundred milliseconds, hence the short pauses: a fault that
        strikes then exercises the requeue of leased-but-not-started jobs as well as running ones.
        """
        stop = threading.Event()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leased = self.leased_to(agent_id)
            if leased and self.in_flight(agent):
                return leased
            stop.wait(0.2)
        self.notes.append(f"no moment with a job leased to {agent} but not started within {timeout:.0f} s")
        return {}

    def requeued(self, leased: dict[str, int]) -> bool:
        """Every one of these jobs went back to the queue (its fencing bumped) since the snapshot."""
        rows = {j["id"]: j for j in self.jobs()}
        for job_id, fencing in leased.items():
            job = rows.get(job_id)
            if job is None or not (job["fencing"] > fencing or job["state"] == "queued"):
                return False
        return True

    def offline_in_list(self, agent_id: str) -> object:
        """True once ``airflow edge-agents list --json`` shows the agent offline; MISSING without the fields."""
        rows = self.stack.list_agents()
        row = next((r for r in rows if r.get("id") == agent_id), None)
        if row is None:
            raise RuntimeError(f"agent {agent_id} is not in 'airflow edge-agents list --json'")
        if "online" not in row and "status" not in row:
            return MISSING
        return row.get("online") is False or row.get("status") in ("offline", "draining (offline)")

    def watch_dead_agent(
        self, agent: str, agent_id: str, leased: dict[str, int], *, t0: float, timeout: float, every: float
    ) -> Callable[[], None]:
        """Watch the hosted side notice a dead agent: shown offline by the CLI (polled ``every`` s),
        its ``leased`` jobs requeued. Returns the call that records both (``detection_s``, ``requeue_s``)."""
        detect = self.watch(f"agent {agent} offline in 'airflow edge-agents list'",
                            lambda: self.offline_in_list(agent_id), every=every, t0=t0, timeout=timeout)
        requeue = (
            self.watch(f"agent {agent}'s leased jobs requeued", lambda: self.requeued(leased), t0=t0, timeout=timeout)
            if leased else None
        )

        def record() -> None:
            self.record_detection("detection_s", detect, timeout)
            if requeue is not None:
                self.record("requeue_s", requeue, timeout)

        return record

    def record_detection(self, name: str, sw: Stopwatch, timeout: float) -> float | None:
        seconds = self.record(name, sw, timeout)
        if sw.value == MISSING:
            self.figures[name] = None
            self.problem("'airflow edge-agents list --json' rows have neither 'online' nor 'status' "
                         "(issue 4 contract, server side): a dead agent's detection cannot be observed")
            return None
        if seconds is None:
            self.problem(f"'airflow edge-agents list --json' never showed the agent offline ({name})")
        return seconds

    # ---- faults and figures ---------------------------------------------------------------------

    def fault(self, what: str) -> float:
        """Count a fault about to be injected; its monotonic time."""
        self.faults += 1
        self.notes.append(f"fault {self.faults}: {what} at {datetime.now(UTC).isoformat(timespec='seconds')}")
        return time.monotonic()

    def watch(self, what: str, check: Callable[[], object], **kwargs: Any) -> Stopwatch:
        sw = Stopwatch(what, check, **kwargs)
        self._watches.append(sw)
        return sw

    def watch_work(self, what: str, check: Callable[[], object], **kwargs: Any) -> Stopwatch:
        """A watch for more work of the run (a lease, a finished task): it gives up when the run ends first."""
        return self.watch(what, lambda: check() or (RUN_OVER if self.run_over() else False), **kwargs)

    def record(self, name: str, sw: Stopwatch, timeout: float) -> float | None:
        """Wait for a stopwatch and store its figure (None, with a note, when it never fired)."""
        seconds = sw.wait(timeout)
        if sw.value == RUN_OVER:
            seconds = None
            self.notes.append(f"{name}: the run ended before '{sw.what}' happened")
        self.figures[name] = seconds
        if seconds is None and sw.value != RUN_OVER:
            self.notes.append(f"{name}: '{sw.what}' not seen within the watch" + (f" (last error: {sw.error})" if sw.error else ""))
        return seconds

    def problem(self, message: str) -> None:
        """A check outside the verdict (e.g. the drained agent's exit code) that failed."""
        self.extra_problems.append(message)

    # ---- the end --------------------------------------------------------------------------------

    def finish(self) -> Evidence:
        """Wait for the run to end and the aftermath to settle; the evidence."""
        assert self.run_id
        try:
            self.stack.wait_run(DAG_ID, self.run_id, timeout=RUN_TIMEOUT)
        except StackError as exc:
            self.fail(f"the run did not finish: {exc}")
        # From Airflow's own record: the test may only get here after a fault's watches ran out.
        self.figures["run_seconds"] = self.stack.run_duration(self.run_id)
        self._settle()
        return self.stack.evidence(self.run_id)

    def _settle(self) -> None:
        """Job rows closed and every agent's spool empty, or SETTLE_TIMEOUT passed (the checks then say what is left)."""

        def settled() -> bool | None:
            if any(j["state"] not in ("success", "failed", "cancelled") for j in self.jobs()):
                return None
            for agent in self.stack.agents:
                spool = (self.stack.agent_status(agent) or {}).get("spool") or {}
                if agent.alive and spool.get("jobs"):
                    return None
            return True

        try:
            self.stack.wait_until("job rows to close and spools to drain", settled, SETTLE_TIMEOUT, ())
        except StackError as exc:
            self.notes.append(f"not settled after the run: {str(exc).splitlines()[0]}")

    def conclude(self, may_fail: Iterable[TryKey] = ()) -> Verdict:
        """Wait for the run's end (:meth:`finish`), judge it, write the figures, fail the test (with the
        evidence) if anything is wrong. ``may_fail``: the tries the fault may cost (no other may fail)."""
        ev = self.finish()
        expect = Expectation(may_fail=frozenset(may_fail), retries=RETRIES)
        self.close()
        verdict = judge(ev, expect)
        verdict.problems += self.extra_problems
        self._write(ev, verdict, expect)
        if verdict.problems:
            self.fail(
                "\n".join(f"* {p}" for p in verdict.problems)
                + "\n\n=== witnesses of the tries in question ===\n" + explain(ev, verdict.suspects),
                ev,
            )
        return verdict

    def _write(self, ev: Evidence, verdict: Verdict, expect: Expectation) -> None:
        counts = verdict.counts
        data = {
            "test": self.test,
            "title": self.title,
            "fault": self.fault_text,
            "passed": not verdict.problems,
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": ev.run_id,
            "run_state": ev.run_state,
            "tasks": counts.get("tasks"),
            "tries_run": counts.get("tries_run"),
            "airflow_tries": counts.get("airflow_tries"),
            "failed_tries": counts.get("failed_tries"),
            "allowed_failures": len(expect.may_fail),
            "retried_tasks": counts.get("retried_tasks"),
            "faults_injected": self.faults,
            "tasks_lost": counts.get("tasks_lost"),
            "duplicates": duplicates(verdict),
            "reports_lost": counts.get("reports_lost"),
            "counts": counts,
            "figures": self.figures,
            "notes": self.notes,
            "problems": verdict.problems,
            "config": {
                "agents": 2,
                "agent_concurrency": AGENT_CONCURRENCY,
                "schedulers": 2,
                "gateways": 2,
                "retries": RETRIES,
                "task_instance_heartbeat_timeout_s": TASK_HEARTBEAT_TIMEOUT,
                "agent_dead_after_s": AGENT_DEAD_AFTER,
                "cpus": os.cpu_count(),
            },
        }
        text = json.dumps(data, indent=2, default=str) + "\n"
        atomic_write(FIGURES_DIR / f"{self.test}.json", text.encode(), 0o644)

    def close(self) -> None:
        """Stop every watch still running (a test that broke off left them polling)."""
        for sw in self._watches:
            sw.stop()

    def fail(self, message: str, ev: Evidence | None = None) -> NoReturn:
        self.close()
        parts = [f"[{self.test}] {message}"]
        if self.notes:
            parts.append("--- notes ---\n" + "\n".join(self.notes))
        if self.figures:
            parts.append("--- figures ---\n" + json.dumps(self.figures, default=str))
        parts.append(self.summary(ev))
        parts.append(self.stack.describe())
        pytest.fail("\n".join(parts), pytrace=False)

    def summary(self, ev: Evidence | None) -> str:
        """The run's TI states and job rows: counts, then every row that is not a plain success."""
        if self.run_id is None:
            return "(no run triggered)"
        try:
            ev = ev or self.stack.evidence(self.run_id)
        except Exception as exc:  # noqa: BLE001 - the failure message must go out whatever broke
            return f"(could not read the run {self.run_id}: {exc})"
        out = [f"--- run {ev.run_id}: {ev.run_state} ---"]
        out.append(f"task instances by state: {dict(Counter(t['state'] for t in ev.tis))}")
        out += [f"  ti {t}" for t in ev.tis if t["state"] != "success" or t["try_number"] != 1]
        out.append(f"task instance history rows: {len(ev.history)}")
        out.append(f"job rows by state: {dict(Counter(j['state'] for j in ev.jobs))}")
        out += [f"  job {j}" for j in ev.jobs if j["state"] != "success" or j["exit_code"] != 0]
        return "\n".join(out)


__all__ = ["FIGURES_DIR", "MISSING", "Chaos", "Stopwatch", "after"]
