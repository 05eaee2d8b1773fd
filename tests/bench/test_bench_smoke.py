"""Smoke run of the benchmark harness (``bench/``): a tiny version, the real machinery.

One round of every scenario with EdgeAgentExecutor and LocalExecutor only (edge3 is never in the
project's venv), a couple of tasks and slots, ten simulated long-polling agents; PostgreSQL when a
server is installed, else SQLite. It checks that ``latest.json`` comes out with the documented
shape and figures that make sense, not what the figures are (2 shared cores: never assert on
durations). The full benchmark is ``make bench``, not part of ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from pgcluster import find_bindir

pytestmark = pytest.mark.e2e

HARNESS_TIMEOUT = 540
SLOTS = 2
CLIENTS = 10
SAMPLES = 3


def _db() -> str:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "sqlite"
    return "postgres" if find_bindir() is not None else "sqlite"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    argv = [
        sys.executable, "-m", "bench.run", "--quick", "--rounds", "1", "--executors", "agent,local",
        "--scenarios", "dispatch,makespan,memory,gateway", "--db", _db(),
        "--concurrency", str(SLOTS), "--dispatch-runs", "1", "--dispatch-tasks", "2", "--trivial-tasks", "4",
        "--sleep-seconds", "6", "--lp-clients", str(CLIENTS), "--lp-samples", str(SAMPLES),
        "--lp-idle-seconds", "2", "--no-warmup", "--no-doc", "--results-dir", str(out), "--work-dir", str(out / "work"),
    ]
    try:
        done = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=HARNESS_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the harness did not finish in {HARNESS_TIMEOUT}s:\n{(exc.stdout or b'')[-4000:]!r}",
                    pytrace=False)
    context = f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}"
    if done.returncode != 0:
        pytest.fail(f"bench/run.py failed ({context})", pytrace=False)
    latest = out / "latest.json"
    assert latest.exists(), context
    data = json.loads(latest.read_text())
    data["_context"] = context
    data["_stdout"] = done.stdout
    return data


def _row(data: dict[str, Any], key: str, scenario: str) -> dict[str, Any]:
    rows = [r for r in data["results"] if r["key"] == key and r["scenario"] == scenario]
    assert len(rows) == 1, f"expected one {key}/{scenario} row in {data['results']}\n{data['_context']}"
    return rows[0]


def test_shape(bench_run: dict[str, Any]) -> None:
    assert set(bench_run) >= {"meta", "results", "targets", "gateway", "rounds"}
    meta = bench_run["meta"]
    assert meta["executors"] == ["agent", "local"]
    assert meta["options"]["concurrency"] == SLOTS
    assert {(r["key"], r["scenario"]) for r in bench_run["results"]} == {
        (k, s) for k in ("agent", "local") for s in ("dispatch", "makespan", "memory")
    }
    for row in bench_run["results"]:
        assert row["errors"] == [], bench_run["_context"]
        assert row["rounds"] == 1
        for field in ("dispatch_ms_median", "dispatch_ms_p95", "makespan_s", "tasks_per_minute",
                      "pss_per_task_mb", "idle_rss_mb", "http_requests_per_task"):
            assert field in row
    assert all(r["error"] is None for r in bench_run["rounds"]), bench_run["_context"]


@pytest.mark.parametrize("key", ["agent", "local"])
def test_figures_are_sane(bench_run: dict[str, Any], key: str) -> None:
    dispatch = _row(bench_run, key, "dispatch")
    assert dispatch["dispatch_samples"] == 2
    assert 0 < dispatch["dispatch_ms_median"] <= dispatch["dispatch_ms_p95"]
    assert dispatch["http_requests_per_task"] > 0  # every task calls the Execution API at least once

    makespan = _row(bench_run, key, "makespan")
    assert makespan["tasks_per_round"] == 4
    assert makespan["makespan_s"] > 0
    assert makespan["tasks_per_minute"] == pytest.approx(60 * 4 / makespan["makespan_s"])

    memory = _row(bench_run, key, "memory")
    assert memory["pss_per_task_mb"] > 0  # running tasks add processes to the tree
    assert memory["idle_rss_mb"] > 0
    if key == "agent":
        assert memory["idle_rss_zygote_mb"] > 0  # the zygote is found and reported apart


def test_gateway_longpoll(bench_run: dict[str, Any]) -> None:
    gateway = bench_run["gateway"]
    assert "error" not in gateway, gateway
    assert gateway["clients"] == CLIENTS
    assert gateway["polls_held_at_end"] == CLIENTS
    assert gateway["samples"] == SAMPLES and gateway["timeouts"] == 0
    assert gateway["unexpected_leases"] == 0  # each job reached the one client of its queue
    assert 0 < gateway["wake_ms_median"] <= gateway["wake_ms_max"]
    assert gateway["gateway_rss_mb"] > 0 and gateway["gateway_cpu_busy_pct"] is not None


def test_targets_and_table(bench_run: dict[str, Any]) -> None:
    targets = {t["target"]: t for t in bench_run["targets"]}
    assert any("LocalExecutor" in name for name in targets)
    for target in targets.values():
        assert target["met"] in (True, False, None)
    # edge3 is not in this run: its comparisons cannot be judged.
    assert all(t["met"] is None for n, t in targets.items() if "EdgeExecutor" in n)
    assert "dispatch p50 ms" in bench_run["_stdout"] and "bench: wrote" in bench_run["_stdout"]
