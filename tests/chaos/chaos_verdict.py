"""The chaos suite's checks: given everything recorded about one DAG run, list what went wrong.

Pure functions over :class:`chaos_stack.Evidence` (no processes, no I/O), so they are unit-tested
with made-up evidence (``test_chaos_verdict.py``). Three independent witnesses are compared:

* Airflow: ``task_instance`` (the last try) and ``task_instance_history`` (earlier tries);
* the task code itself: the DAG's ledger, one ``start`` and one ``end`` line per try that ran;
* the agents' audit logs (``decision``, ``start``, ``run``, ``finish`` entries) and our ``edge_agent_job`` rows.

A try is keyed ``(task_id, map_index, try_number)`` (one DAG run at a time).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

TryKey = tuple[str, int, int]

TERMINAL_JOB_STATES = ("success", "failed", "cancelled")
#: States a finished earlier try keeps in ``task_instance_history``.
FAILED_TRY_STATES = ("failed", "up_for_retry")
#: How many examples a problem message lists (the evidence dump has the rest).
EXAMPLES = 8


class EvidenceLike(Protocol):
    run_state: str
    tis: list[dict[str, Any]]
    history: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    ledger: list[dict[str, Any]]
    audit: dict[str, list[dict[str, Any]]]
    agent_names: dict[str, str]


@dataclass(frozen=True)
class Expectation:
    """What the injected fault may do to tries: fail the ones it killed, nothing else.

    ``may_fail``: tries the fault may fail (they were running where it struck); any other failed
    try is a problem. Empty for faults that must not cost a try (gateway restart, scheduler
    restart, drain).
    """

    may_fail: frozenset[TryKey] = frozenset()
    retries: int = 3


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    #: Tries a problem is about, for the evidence dump.
    suspects: set[TryKey] = field(default_factory=set)

    def add(self, message: str, keys: Iterable[TryKey] = ()) -> None:
        keys = sorted(set(keys))
        self.suspects.update(keys)
        if keys:
            shown = ", ".join(fmt(k) for k in keys[:EXAMPLES])
            more = f" (+{len(keys) - EXAMPLES} more)" if len(keys) > EXAMPLES else ""
            message = f"{message}: {len(keys)} tr{'y' if len(keys) == 1 else 'ies'}: {shown}{more}"
        self.problems.append(message)


def fmt(key: TryKey) -> str:
    task, map_index, try_number = key
    return f"{task}{'' if map_index < 0 else f'[{map_index}]'}#{try_number}"


def ledger_key(row: dict[str, Any]) -> TryKey:
    return (str(row["task"]), int(row["map"]), int(row["try"]))


def audit_key(entry: dict[str, Any]) -> TryKey | None:
    ti = entry.get("ti") or {}
    try:
        return (str(ti["task_id"]), int(ti.get("map_index", -1)), int(ti["try_number"]))
    except (KeyError, TypeError, ValueError):
        return None


def row_key(row: dict[str, Any]) -> TryKey:
    return (str(row["task_id"]), int(row["map_index"]), int(row["try_number"]))


def judge(ev: EvidenceLike, expect: Expectation) -> Verdict:
    """Every check; the verdict's ``counts`` are the figures the report publishes."""
    v = Verdict()
    tries = _airflow_tries(ev, expect, v)
    _check_ledger(ev, tries, v)
    _check_audit(ev, v)
    _check_jobs(ev, tries, v)
    return v


# -------------------------------------------------------------------------------------------------
# Airflow's view: the run, the final tries, the history
# -------------------------------------------------------------------------------------------------


def _airflow_tries(ev: EvidenceLike, expect: Expectation, v: Verdict) -> dict[TryKey, str | None]:
    """Every try Airflow knows, with its state; checks states, history and the allowed failures."""
    if ev.run_state != "success":
        v.add(f"the DAG run ended {ev.run_state!r}, expected 'success'")
    tries: dict[TryKey, str | None] = {}
    not_success = []
    too_many = []
    for ti in ev.tis:
        key = row_key(ti)
        tries[key] = ti["state"]
        if ti["state"] != "success":
            not_success.append(key)
        if ti["try_number"] > expect.retries + 1:
            too_many.append(key)
    if not ev.tis:
        v.add("the run has no task instances")
    if not_success:
        states = Counter(tries[k] for k in not_success)
        v.add(f"task instances not in state success (states {dict(states)})", not_success)
    if too_many:
        v.add(f"task instances beyond {expect.retries} retries", too_many)

    by_ti: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in ev.history:
        by_ti[(row["task_id"], row["map_index"])].append(row)
    ran = {ledger_key(r) for r in ev.ledger if r["ev"] == "start"}
    job_states = {row_key(j): j["state"] for j in ev.jobs}
    gaps, odd_states, failed, unarchived = [], [], [], []
    for ti in ev.tis:
        earlier = by_ti.pop((ti["task_id"], ti["map_index"]), [])
        numbers = sorted(r["try_number"] for r in earlier)
        if len(set(numbers)) != len(numbers) or any(n < 1 or n >= ti["try_number"] for n in numbers):
            gaps.append(row_key(ti))
        for missing in sorted(set(range(1, ti["try_number"])) - set(numbers)):
            key = (ti["task_id"], ti["map_index"], missing)
            # Airflow 3.3 archives a try only if it failed RUNNING (taskinstance.handle_failure): a
            # try that failed still QUEUED (its supervisor died before Airflow's /run) leaves no
            # history row. Only a try that never ran and whose job failed may be missing.
            if key in ran or job_states.get(key) not in ("failed", "cancelled"):
                gaps.append(key)
            else:
                tries[key] = "failed"
                failed.append(key)
                unarchived.append(key)
        for row in earlier:
            key = row_key(row)
            tries[key] = row["state"]
            if row["state"] in FAILED_TRY_STATES:
                failed.append(key)
            else:
                odd_states.append(key)
    if gaps:
        v.add("task instance history does not hold the tries before the current one (a try that ran or "
              "did not fail is missing, or a row is doubled or out of range)", gaps)
    if by_ti:
        v.add("task instance history rows for tasks the run does not have",
              [row_key(r) for rows in by_ti.values() for r in rows])
    if odd_states:
        v.add("earlier tries in the history that did not fail (state not failed/up_for_retry)", odd_states)
    unexpected = [k for k in failed if k not in expect.may_fail]
    if unexpected:
        v.add("tries failed that the fault had no business failing", unexpected)
    v.counts.update(
        tasks=len(ev.tis),
        tasks_lost=len(not_success),
        airflow_tries=len(tries),
        failed_tries=len(failed),
        failed_unarchived=len(unarchived),
        retried_tasks=sum(1 for ti in ev.tis if ti["try_number"] > 1),
    )
    return tries


# -------------------------------------------------------------------------------------------------
# The ledger: what really ran
# -------------------------------------------------------------------------------------------------


def _check_ledger(ev: EvidenceLike, tries: dict[TryKey, str | None], v: Verdict) -> None:
    starts: dict[TryKey, list[dict[str, Any]]] = defaultdict(list)
    ends: dict[TryKey, list[dict[str, Any]]] = defaultdict(list)
    for row in ev.ledger:
        (starts if row["ev"] == "start" else ends)[ledger_key(row)].append(row)
    twice = [k for k, rows in starts.items() if len(rows) > 1]
    if twice:
        v.add("a try's code started more than once (ledger)", twice)
    unknown = [k for k in starts if k not in tries]
    if unknown:
        v.add("the ledger shows tries Airflow has no record of", unknown)
    orphan_ends = [k for k in ends if k not in starts]
    if orphan_ends:
        v.add("ledger end lines without a start", orphan_ends)
    unrun = [k for k, state in tries.items() if state == "success" and (len(starts[k]) != 1 or len(ends[k]) != 1)]
    if unrun:
        v.add("successful tries without exactly one start and one end in the ledger", unrun)
    nameless = [k for k, rows in starts.items() if any(not r.get("agent") for r in rows)]
    if nameless:
        v.add("tries that ran outside the chaos agents (no agent marker)", nameless)
    v.counts.update(
        tries_run=len(starts),
        ledger_duplicates=len(twice),
        by_agent=dict(Counter(rows[0].get("agent") or "?" for rows in starts.values())),
    )


# -------------------------------------------------------------------------------------------------
# The agents' audit logs
# -------------------------------------------------------------------------------------------------


def _audit_events(ev: EvidenceLike, event: str) -> list[tuple[str, TryKey, dict[str, Any]]]:
    out = []
    for agent, entries in ev.audit.items():
        for entry in entries:
            key = audit_key(entry)
            if entry.get("event") == event and key is not None:
                out.append((agent, key, entry))
    return out


def _check_audit(ev: EvidenceLike, v: Verdict) -> None:
    """A ``run`` entry (Airflow accepted the try's ``/run`` from this agent) is what says a try ran.

    ``start`` only says a supervisor was forked: an agent cut off after forking sees its job
    requeued, and its supervisor never gets past ``/run``, so two ``start`` of a try are allowed
    and counted, two ``run`` are a duplicate.
    """
    starts = _audit_events(ev, "start")
    runs = _audit_events(ev, "run")
    per_try = Counter(key for _, key, _ in runs)
    twice = [k for k, n in per_try.items() if n > 1]
    if twice:
        agents = {k: sorted(a for a, key, _ in runs if key == k) for k in twice}
        v.add(f"the agents' audit logs record more than one run of a try (agents: "
              f"{dict([(fmt(k), a) for k, a in agents.items()][:EXAMPLES])})", twice)
    ledger_starts = {(ledger_key(r), r.get("agent")) for r in ev.ledger if r["ev"] == "start"}
    audited = {(key, agent) for agent, key, _ in runs}
    if not runs and ledger_starts:
        v.add("no agent audit log has a 'run' event: the audit cannot show which tries ran "
              f"({len(ledger_starts)} tries ran per the ledger)")
    else:
        missing = [key for key, agent in ledger_starts if (key, agent) not in audited]
        if missing:
            v.add("tries that ran (ledger) without a 'run' event in the audit log of the agent that ran them",
                  missing)
        started = {(key, agent) for agent, key, _ in starts}
        unstarted = [key for key, agent in audited if (key, agent) not in started]
        if unstarted:
            v.add("tries with a 'run' but no 'start' event in the same agent's audit log", unstarted)
    v.counts.update(audit_starts=len(starts), audit_runs=len(runs),
                    audit_starts_not_run=len(starts) - len(runs), audit_duplicates=len(twice))


# -------------------------------------------------------------------------------------------------
# Our job rows against the agents' reports
# -------------------------------------------------------------------------------------------------


def _agrees(job_state: str, try_state: str | None) -> bool:
    """A job row's terminal state says the same as Airflow's state of its try."""
    if job_state == "success":
        return try_state == "success"
    return try_state in FAILED_TRY_STATES


def _check_jobs(ev: EvidenceLike, tries: dict[TryKey, str | None], v: Verdict) -> None:
    """Job rows against Airflow and against the agents' audit ``finish`` entries.

    A row carries the agent's exit code once its report arrived. A row closed by the hosted side
    without one (its agent went offline and Airflow settled the try: the contract's "then the job
    is closed", fencing bumped) must say what Airflow says of the try; the agent's late report is
    then refused (409), by design, and counted as ``late_reports_refused``, not as lost.
    """
    rows_per_try: dict[TryKey, list[dict[str, Any]]] = defaultdict(list)
    by_id = {}
    for job in ev.jobs:
        rows_per_try[row_key(job)].append(job)
        by_id[job["id"]] = job
    doubled = [k for k, rows in rows_per_try.items() if len(rows) > 1]
    if doubled:
        v.add("more than one job row for a try", doubled)
    open_rows = [row_key(j) for j in ev.jobs if j["state"] not in TERMINAL_JOB_STATES]
    if open_rows:
        states = Counter(j["state"] for j in ev.jobs if j["state"] not in TERMINAL_JOB_STATES)
        v.add(f"job rows left open (states {dict(states)}): a report was lost or a job is stuck", open_rows)
    no_row = [k for k, state in tries.items() if state == "success"
              and not any(j["state"] == "success" for j in rows_per_try.get(k, []))]
    if no_row:
        v.add("successful tries without a job row in state success", no_row)
    closed = [j for j in ev.jobs if j["state"] in TERMINAL_JOB_STATES and j["exit_code"] is None]
    disagree = [row_key(j) for j in closed if not _agrees(j["state"], tries.get(row_key(j)))]
    if disagree:
        v.add("job rows closed without the agent's report in a state Airflow's try does not have", disagree)
    wrong_code = [row_key(j) for j in ev.jobs if j["exit_code"] is not None
                  and (j["state"] == "success") != (j["exit_code"] == 0)]
    if wrong_code:
        v.add("job rows whose state contradicts their exit code", wrong_code)

    finishes = _audit_events(ev, "finish")
    finished_ids: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    lost, mismatched, refused_late, superseded = [], [], [], []
    for agent, key, entry in finishes:
        finished_ids[str(entry.get("job_id"))].append((agent, entry))
        job = by_id.get(entry.get("job_id"))
        if job is None:
            lost.append(key)
        elif job["state"] not in TERMINAL_JOB_STATES:
            continue  # already reported as an open row
        elif job["exit_code"] is None:
            refused_late.append(key)  # closed by the hosted side; its state was checked above
        elif entry.get("fencing") != job["fencing"]:
            superseded.append(key)  # the row's exit code is another lease's (requeued, run again)
        elif job["exit_code"] != entry.get("exit_code"):
            mismatched.append(key)
    if lost:
        v.add("agent 'finish' reports for jobs that have no row", lost)
    if mismatched:
        v.add("job rows whose exit code differs from the agent's audit 'finish' entry", mismatched)
    unaudited = []
    for job in ev.jobs:
        if job["exit_code"] is None:
            continue
        name = ev.agent_names.get(job["agent_id"] or "", job["agent_id"])
        if not any(agent == name and entry.get("exit_code") == job["exit_code"]
                   for agent, entry in finished_ids.get(job["id"], [])):
            unaudited.append(row_key(job))
    if unaudited:
        v.add("job rows with an exit code but no matching 'finish' entry in that agent's audit log", unaudited)
    v.counts.update(
        job_rows=len(ev.jobs),
        open_job_rows=len(open_rows),
        reports_lost=len(lost) + len(open_rows) + len(disagree),
        closed_by_hosted_side=len(closed),
        late_reports_refused=len(refused_late),
        superseded_reports=len(superseded),
    )


def duplicates(v: Verdict) -> int:
    """Tries that ran twice by any witness (the ledger or the audit logs)."""
    return max(int(v.counts.get("ledger_duplicates", 0)), int(v.counts.get("audit_duplicates", 0)))


def explain(ev: EvidenceLike, keys: Iterable[TryKey], limit: int = 12) -> str:
    """Every witness's lines about some tries, for a failure message."""
    out = []
    for key in sorted(keys)[:limit]:
        out.append(f"--- {fmt(key)} ---")
        out += [f"  airflow ti: {ti}" for ti in ev.tis if row_key(ti)[:2] == key[:2]]
        out += [f"  history: {h}" for h in ev.history if row_key(h)[:2] == key[:2]]
        out += [f"  ledger: {r}" for r in ev.ledger if ledger_key(r)[:2] == key[:2]]
        for agent, entries in ev.audit.items():
            out += [
                f"  audit {agent}: {e.get('event')} job={e.get('job_id')} fencing={e.get('fencing')} "
                f"exit={e.get('exit_code')} reason={e.get('reason')} time={e.get('time')}"
                for e in entries if (audit_key(e) or ("", 0, 0))[:2] == key[:2]
            ]
        out += [f"  job: {j}" for j in ev.jobs if row_key(j)[:2] == key[:2]]
    return "\n".join(out)


__all__ = ["Expectation", "TryKey", "Verdict", "audit_key", "duplicates", "explain", "fmt", "judge", "ledger_key"]
