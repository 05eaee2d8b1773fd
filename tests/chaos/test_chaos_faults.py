"""Chaos: one fault per test against a 200-task run through two agents, two gateways and two schedulers.

Agent ``chaos-a`` reaches only gateway 1 (``gateway``) and ``chaos-b`` only gateway 2, each through
its own loopback proxy (``conftest.py``, ``chaos_stack.py``). Every test triggers a fresh run, waits
until the agent it hurts is running several tries, injects its fault, times the recovery, waits for
the run to end, and then checks (``chaos_verdict.py``) that every task ended as Airflow's retries
dictate, that no try ran twice (the DAG's own ledger, the agents' audit logs, Airflow's history) and
that no state report was lost (job rows against the agents' audit ``finish`` entries). Figures go
to ``build/chaos/<test>.json``; ``tests/chaos/report.py`` turns them into the table of
``docs/reliability.md``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from chaos_harness import Chaos, after
from chaos_stack import (
    AGENT_A,
    AGENT_B,
    AGENT_DEAD_AFTER,
    TASK_HEARTBEAT_TIMEOUT,
    ensure_stopped,
    utcnow,
)
from chaos_verdict import TryKey

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

GATEWAY_DOWN = 10.0
#: A running task's last heartbeat may be this old when its gateway dies (the Task SDK
#: supervisor heartbeats every [workers] min_heartbeat_interval = 5 s, plus the call's own time).
HEARTBEAT_SLACK = 10.0
PARTITION = 60.0
#: Bounds of the watches (hangs, not expectations).
DETECT_WATCH = AGENT_DEAD_AFTER + 150.0
RETRY_WATCH = TASK_HEARTBEAT_TIMEOUT + 180.0
RECOVERY_WATCH = 180.0
DRAIN_TIMEOUT = 180.0
SCHEDULER_STOP_TIMEOUT = 120.0
#: Between two `airflow edge-agents list` calls (each costs seconds of CPU the run needs too).
CLI_PAUSE = 2.0


def _retried(chaos: Chaos, tries: set[TryKey]) -> bool:
    """Airflow has moved every one of these tries on (failed it and scheduled the next try)."""
    assert chaos.run_id
    current = {(t["task_id"], t["map_index"]): t for t in chaos.stack.ti_rows(chaos.run_id)}
    return all(
        (ti := current.get(key[:2])) is not None and (ti["try_number"] > key[2] or ti["state"] == "up_for_retry")
        for key in tries
    )


@pytest.mark.chaos_fault(
    "gateway_kill", "Gateway killed", "kill -9 of gateway 1 (agent A's only gateway) mid-run, restarted after 10 s"
)
def test_gateway_kill(chaos: Chaos) -> None:
    """A picks up again; no try may fail unless the outage outlasted Airflow's task heartbeat timeout."""
    stack = chaos.stack
    chaos.trigger()
    chaos.figures["in_flight_on_a"] = len(chaos.wait_busy(AGENT_A))
    agent_id = stack.agent(AGENT_A).agent_id

    t_kill = chaos.fault("kill -9 of gateway 1")
    stack.kill9(stack.component("gateway"))
    running = chaos.open_accepted(AGENT_A)
    stack.pause(GATEWAY_DOWN)

    since, t_restart = utcnow(), time.monotonic()
    heartbeat = chaos.watch(
        "agent A's heartbeat accepted by the restarted gateway",
        lambda: after(stack.agent_last_heartbeat(agent_id), since), t0=t_restart, timeout=RECOVERY_WATCH,
    )
    lease = chaos.watch_work(
        "agent A leases a job again",
        lambda: any(j["agent_id"] == agent_id and after(j["leased_at"], since) for j in chaos.jobs()),
        t0=t_restart, timeout=RECOVERY_WATCH,
    )
    finished = chaos.watch_work(
        "a task of agent A finished through the restarted gateway",
        # With an exit code: reported by the agent, not closed by the hosted side while it was away.
        lambda: any(
            j["agent_id"] == agent_id and j["state"] == "success" and j["exit_code"] is not None
            and after(j["finished_at"], since)
            for j in chaos.jobs()
        ),
        t0=t_restart, timeout=RECOVERY_WATCH,
    )
    stack.restart("gateway")
    chaos.figures["gateway_ready_s"] = round(time.monotonic() - t_restart, 2)
    chaos.figures["gateway_outage_s"] = round(time.monotonic() - t_kill, 2)
    chaos.record("agent_heartbeat_s", heartbeat, RECOVERY_WATCH)
    chaos.record("agent_lease_s", lease, RECOVERY_WATCH)
    chaos.record("first_task_finished_s", finished, RECOVERY_WATCH)

    # Running tries outlive an outage shorter than Airflow's task heartbeat timeout (less the
    # supervisor's heartbeat interval, the age its last heartbeat may have had). A gateway that
    # takes longer to come back (a loaded box) legitimately costs them their try: say so.
    may_fail: set[TryKey] = set()
    if chaos.figures["gateway_outage_s"] > TASK_HEARTBEAT_TIMEOUT - HEARTBEAT_SLACK:
        may_fail = running
        chaos.notes.append(
            f"the outage ({chaos.figures['gateway_outage_s']:.0f} s) exceeded Airflow's task heartbeat timeout "
            f"({TASK_HEARTBEAT_TIMEOUT} s) less {HEARTBEAT_SLACK:.0f} s: agent A's running tries may fail"
        )
    chaos.conclude(may_fail)


@pytest.mark.chaos_fault(
    "agent_kill", "Agent killed", "kill -9 of agent A's control process mid-task, restarted with its state dir"
)
def test_agent_kill(chaos: Chaos) -> None:
    """A's running tries die with it and are retried elsewhere; its leased ones are requeued."""
    stack = chaos.stack
    chaos.trigger()
    chaos.wait_busy(AGENT_A)
    agent = stack.agent(AGENT_A)
    leased = chaos.catch_leased(agent.agent_id, AGENT_A)
    running = chaos.in_flight(AGENT_A)

    t_kill = chaos.fault("kill -9 of agent A")
    stack.kill9(agent)
    # The audit log is final now (only the control process writes it): every try A accepted and
    # did not finish may fail; those whose supervisor started will (the leased ones are requeued).
    may_fail = chaos.open_accepted(AGENT_A)
    # A lease the gateway still saw as not started is requeued as the same try, not retried.
    requeued = {(j["task_id"], j["map_index"], j["try_number"]) for j in chaos.jobs() if j["id"] in leased}
    killed = chaos.open_accepted(AGENT_A, started=True) - requeued
    chaos.figures.update(
        in_flight_on_a=len(running), started_at_fault=len(killed), leased_at_fault=len(leased)
    )
    record_dead = chaos.watch_dead_agent("A", agent.agent_id, leased, t0=t_kill, timeout=DETECT_WATCH, every=CLI_PAUSE)
    retried = (
        chaos.watch("Airflow retried agent A's killed tries", lambda: _retried(chaos, killed), t0=t_kill,
                    timeout=RETRY_WATCH)
        if killed else None
    )
    if not stack.wait_group_gone(agent, 60):
        chaos.notes.append("agent A's zygote or tasks outlived it by 60 s (killed before the restart)")

    record_dead()
    t_restart = time.monotonic()
    stack.restart_agent(AGENT_A)
    chaos.figures["restart_s"] = round(time.monotonic() - t_restart, 2)
    if retried is not None:
        chaos.record("killed_tries_retried_s", retried, RETRY_WATCH)

    chaos.conclude(may_fail)


@pytest.mark.chaos_fault(
    "partition", "Network partition", "agent A cut off from its gateway for 60 s (proxy blackholes both ways)"
)
def test_partition(chaos: Chaos) -> None:
    """Longer than Airflow's task heartbeat timeout: A's running tries fail and retry, nothing runs twice."""
    stack = chaos.stack
    chaos.trigger()
    chaos.wait_busy(AGENT_A)
    agent = stack.agent(AGENT_A)

    running = chaos.in_flight(AGENT_A)
    t_cut = chaos.fault("partition of agent A from gateway 1")
    stack.proxy_a.partition()
    leased = chaos.leased_to(agent.agent_id)
    may_fail = chaos.open_accepted(AGENT_A)
    chaos.figures.update(in_flight_on_a=len(running), leased_at_fault=len(leased))
    spool_max: dict[str, Any] = {"jobs": 0, "bytes": 0}

    def noticed() -> bool:
        status = stack.agent_status(agent) or {}
        spool = status.get("spool") or {}
        spool_max["jobs"] = max(spool_max["jobs"], int(spool.get("jobs") or 0))
        spool_max["bytes"] = max(spool_max["bytes"], int(spool.get("bytes") or 0))
        return (status.get("gateway") or {}).get("reachable") is False

    record_dead = chaos.watch_dead_agent("A", agent.agent_id, leased, t0=t_cut, timeout=PARTITION, every=CLI_PAUSE)
    aware = chaos.watch("agent A's status shows the gateway unreachable", noticed, t0=t_cut, timeout=PARTITION)
    record_dead()
    chaos.record("agent_noticed_s", aware, PARTITION)
    stack.pause(max(0.0, PARTITION - (time.monotonic() - t_cut)))
    noticed()
    chaos.figures["spool_max_jobs"] = spool_max["jobs"]
    chaos.figures["spool_max_bytes"] = spool_max["bytes"]
    may_fail |= chaos.open_accepted(AGENT_A)

    healed, t_heal = utcnow(), time.monotonic()
    stack.proxy_a.heal()
    chaos.figures["partition_s"] = round(t_heal - t_cut, 1)
    heartbeat = chaos.watch(
        "agent A's heartbeat accepted after the heal",
        lambda: after(stack.agent_last_heartbeat(agent.agent_id), healed), t0=t_heal, timeout=RECOVERY_WATCH,
    )
    drained = chaos.watch(
        "agent A's spool empty after the heal",
        lambda: ((stack.agent_status(agent) or {}).get("spool") or {"jobs": None}).get("jobs") == 0,
        t0=t_heal, timeout=RECOVERY_WATCH,
    )
    lease = chaos.watch_work(
        "agent A leases a job after the heal",
        lambda: any(j["agent_id"] == agent.agent_id and after(j["leased_at"], healed) for j in chaos.jobs()),
        t0=t_heal, timeout=RECOVERY_WATCH,
    )
    chaos.record("heal_heartbeat_s", heartbeat, RECOVERY_WATCH)
    chaos.record("spool_drained_s", drained, RECOVERY_WATCH)
    chaos.record("heal_lease_s", lease, RECOVERY_WATCH)

    chaos.conclude(may_fail)


@pytest.mark.chaos_fault(
    "scheduler_restart", "Scheduler restarted", "SIGTERM of scheduler 1 mid-run, then started again"
)
def test_scheduler_restart(chaos: Chaos) -> None:
    """Jobs outlive the scheduler that queued them; their events reach a scheduler; no try fails."""
    stack = chaos.stack
    chaos.trigger()
    chaos.wait_busy(AGENT_A)

    t_term = chaos.fault("SIGTERM of scheduler 1")
    code = ensure_stopped(stack.component("scheduler"), timeout=SCHEDULER_STOP_TIMEOUT)
    chaos.figures.update(scheduler_exit_s=round(time.monotonic() - t_term, 2), scheduler_exit_code=code)
    if code is None:
        chaos.problem(f"scheduler 1 did not exit within {SCHEDULER_STOP_TIMEOUT:.0f} s of SIGTERM")
    since, t_start = utcnow(), time.monotonic()
    stack.restart("scheduler")
    stack.wait_until("the restarted scheduler to heartbeat", lambda: stack.scheduler_started_since(since), 180.0)
    chaos.figures["scheduler_back_s"] = round(time.monotonic() - t_start, 2)

    chaos.conclude()


@pytest.mark.chaos_fault(
    "drain", "Agent drained", "SIGTERM of agent B with tasks running: it drains, reports, exits 0; restarted"
)
def test_drain(chaos: Chaos) -> None:
    """B finishes and reports what it runs, leases nothing more, exits 0; no try fails."""
    stack = chaos.stack
    chaos.trigger()
    chaos.wait_busy(AGENT_B)
    agent = stack.agent(AGENT_B)

    t_term = chaos.fault("SIGTERM of agent B")
    os.kill(agent.proc.pid, signal.SIGTERM)
    running = chaos.open_accepted(AGENT_B)
    chaos.figures["in_flight_on_b"] = len(running)
    try:
        code: int | None = agent.proc.wait(timeout=DRAIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    chaos.figures.update(drain_exit_s=round(time.monotonic() - t_term, 2), drain_exit_code=code)
    if code != 0:
        chaos.problem(f"agent B exited {code!r} after one SIGTERM (drain), expected 0")
    jobs = {(j["task_id"], j["map_index"], j["try_number"]): j for j in chaos.jobs()}
    unreported = sorted(k for k in running if (jobs.get(k) or {}).get("state") != "success")
    chaos.figures["drained_reported"] = len(running) - len(unreported)
    if unreported:
        chaos.problem(
            f"tries agent B was running at SIGTERM not reported success when it exited: "
            f"{[(k, (jobs.get(k) or {}).get('state')) for k in unreported[:8]]}"
        )

    t_restart = time.monotonic()
    stack.restart_agent(AGENT_B)
    chaos.figures["restart_s"] = round(time.monotonic() - t_restart, 2)

    chaos.conclude()
