"""Turn the benchmark's records into the printed table, ``latest.json``, the targets verdict, charts
and the generated part of ``docs/benchmarks.md``.

``latest.json`` holds ``meta`` (machine, versions, options), ``results`` (one object per executor
and scenario: the medians over rounds, dispatch samples pooled), ``targets`` (each of the issue's
targets with the measured figure, the threshold, the ratio and whether it is met), ``gateway``
(the long-poll test) and ``rounds`` (every per-round record, raw).

``docs/benchmarks.md`` is only rewritten between :data:`BEGIN` and :data:`END`; the analysis
around them is written by hand and kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.scenarios import EXECUTOR_NAMES, EXECUTORS, Record, summarise
from edge_agent.fsutil import atomic_write

BEGIN = "<!-- bench:generated:begin (bench/run.py rewrites this block) -->"
END = "<!-- bench:generated:end -->"
SCENARIO_ORDER = ("dispatch", "makespan", "memory")

# The thresholds.
MAKESPAN_RATIO_MAX = 1.2
DISPATCH_VS_EDGE3_MAX = 0.2
PSS_VS_EDGE3_MAX = 0.5
IDLE_RSS_MAX_MB = 60.0
WAKE_MS_MAX = 100.0
LONGPOLL_CLIENTS = 1000


def build_results(records: Sequence[Record]) -> list[dict[str, Any]]:
    out = []
    for scenario in SCENARIO_ORDER:
        for executor in EXECUTORS:
            mine = [r for r in records if r.scenario == scenario and r.executor == executor]
            if mine:
                out.append({"executor": EXECUTOR_NAMES[executor], "key": executor, "scenario": scenario,
                            **summarise(mine)})
    return out


def _get(results: list[dict[str, Any]], key: str, scenario: str, field: str) -> float | None:
    for row in results:
        if row["key"] == key and row["scenario"] == scenario:
            return row.get(field)
    return None


def _target(name: str, measured: float | None, threshold: float | None, unit: str, rule: str,
            ratio: float | None = None) -> dict[str, Any]:
    met = None
    if measured is not None and threshold is not None:
        met = measured <= threshold
    return {"target": name, "measured": measured, "threshold": threshold, "unit": unit, "rule": rule,
            "ratio": ratio, "met": met}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def evaluate_targets(results: list[dict[str, Any]], gateway: dict[str, Any] | None) -> list[dict[str, Any]]:
    agent_d = _get(results, "agent", "dispatch", "dispatch_ms_median")
    local_d = _get(results, "local", "dispatch", "dispatch_ms_median")
    edge3_d = _get(results, "edge3", "dispatch", "dispatch_ms_median")
    agent_m = _get(results, "agent", "makespan", "makespan_s")
    local_m = _get(results, "local", "makespan", "makespan_s")
    agent_p = _get(results, "agent", "memory", "pss_per_task_mb")
    edge3_p = _get(results, "edge3", "memory", "pss_per_task_mb")
    agent_rss = _get(results, "agent", "memory", "idle_rss_mb")
    targets = [
        _target("dispatch median <= LocalExecutor's", agent_d, local_d, "ms", "agent <= local",
                _div(agent_d, local_d)),
        _target("dispatch median <= 1/5 of EdgeExecutor's (defaults)", agent_d,
                edge3_d * DISPATCH_VS_EDGE3_MAX if edge3_d is not None else None, "ms", "agent <= 0.2 x edge3",
                _div(agent_d, edge3_d)),
        _target("100 trivial tasks makespan <= 1.2 x LocalExecutor's", agent_m,
                local_m * MAKESPAN_RATIO_MAX if local_m is not None else None, "s", "agent <= 1.2 x local",
                _div(agent_m, local_m)),
        _target("PSS per running task <= 1/2 of EdgeExecutor worker's", agent_p,
                edge3_p * PSS_VS_EDGE3_MAX if edge3_p is not None else None, "MB", "agent <= 0.5 x edge3",
                _div(agent_p, edge3_p)),
        _target("agent control process idle RSS < 60 MB", agent_rss, IDLE_RSS_MAX_MB, "MB", "< 60 MB",
                _div(agent_rss, IDLE_RSS_MAX_MB)),
    ]
    if gateway is not None:
        wake = gateway.get("wake_ms_median")
        targets.append(_target("gateway wakes the right long-poll within 100 ms (median)", wake, WAKE_MS_MAX,
                               "ms", "<= 100 ms", _div(wake, WAKE_MS_MAX)))
        held = gateway.get("polls_held_at_end")
        clients = gateway.get("clients") or 0
        # Fewer simulated agents than the target's 1,000 (a --quick run) cannot judge it.
        met = None if held is None or clients < LONGPOLL_CLIENTS else (
            held >= clients and not gateway.get("client_errors"))
        targets.append({"target": f"one gateway process holds {LONGPOLL_CLIENTS} concurrent long-polls",
                        "measured": held, "threshold": LONGPOLL_CLIENTS, "unit": "polls", "rule": ">= 1000",
                        "ratio": _div(held, LONGPOLL_CLIENTS), "met": met})
    return targets


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


RESULT_COLUMNS = (
    ("scenario", "scenario", None),
    ("executor", "executor", None),
    ("dispatch p50 ms", "dispatch_ms_median", 0),
    ("dispatch p95 ms", "dispatch_ms_p95", 0),
    ("makespan s", "makespan_s", 1),
    ("tasks/min", "tasks_per_minute", 0),
    ("PSS/task MB", "pss_per_task_mb", 1),
    ("idle RSS MB", "idle_rss_mb", 1),
    ("HTTP req/task", "http_requests_per_task", 1),
    ("rounds", "rounds", None),
)


def _rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(row.get(key), d if d is not None else 0) for _, key, d in RESULT_COLUMNS] for row in results]


def _target_rows(targets: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for t in targets:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        rows.append([t["target"], f"{_fmt(t['measured'], 1)} {t['unit']}", f"{_fmt(t['threshold'], 1)} {t['unit']}",
                     _fmt(t["ratio"], 2), met])
    return rows


def text_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


BREAKDOWN_COLUMNS = (
    ("CPU s/task: worker side", ("cpu_s_per_task", "worker"), 2),
    ("scheduler", ("cpu_s_per_task", "scheduler"), 2),
    ("api-server", ("cpu_s_per_task", "api-server"), 2),
    ("gateway", ("cpu_s_per_task", "gateway"), 2),
    ("total", ("cpu_s_per_task", "total"), 2),
    ("ms: task run", ("phases_ms", "run"), 0),
    ("slot refill", ("phases_ms", "refill"), 0),
    ("wake+lease", ("phases_ms", "wake_lease"), 0),
    ("lease->running", ("phases_ms", "lease_to_start"), 0),
    ("end->reported", ("phases_ms", "end_to_report"), 0),
)


def _breakdown_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for row in results:
        if row["scenario"] != "makespan":
            continue
        cells = [row["executor"]]
        for _, (group, key), digits in BREAKDOWN_COLUMNS:
            cells.append(_fmt((row.get(group) or {}).get(key), digits))
        rows.append(cells)
    return rows


BREAKDOWN_HEADERS = ["makespan run", *(h for h, _, _ in BREAKDOWN_COLUMNS)]


GATEWAY_FIELDS = (
    ("simulated agents (one mTLS connection and one queue each)", "clients", 0),
    ("long-polls held at the end", "polls_held_at_end", 0),
    ("gateway sockets open", "gateway_sockets", 0),
    ("wake-up samples (timeouts)", "samples", 0),
    ("wake-up median ms", "wake_ms_median", 1),
    ("wake-up p95 ms", "wake_ms_p95", 1),
    ("wake-up max ms", "wake_ms_max", 1),
    ("gateway CPU, polls held, nothing queued (% of one core)", "gateway_cpu_idle_pct", 0),
    ("gateway CPU while jobs are queued (% of one core)", "gateway_cpu_busy_pct", 0),
    ("gateway RSS MB", "gateway_rss_mb", 0),
    ("gateway PSS MB", "gateway_pss_mb", 0),
    ("registering all agents, s", "register_seconds", 1),
    ("connecting all agents, s", "connect_seconds", 1),
    ("client errors", "client_errors", 0),
    ("soft open-files limit", "os_open_files_limit", 0),
)


def _gateway_rows(gateway: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, key, digits in GATEWAY_FIELDS:
        value = _fmt(gateway.get(key), digits)
        if key == "samples":
            value += f" ({_fmt(gateway.get('timeouts'))})"
        rows.append([label, value])
    return rows


def render_text(report: dict[str, Any]) -> str:
    parts = [text_table([h for h, _, _ in RESULT_COLUMNS], _rows(report["results"]))]
    if _breakdown_rows(report["results"]):
        parts.append(text_table(BREAKDOWN_HEADERS, _breakdown_rows(report["results"])))
    if report.get("gateway"):
        parts.append(text_table(["gateway long-poll test", "value"], _gateway_rows(report["gateway"])))
    if report.get("targets"):
        parts.append(text_table(["target", "measured", "threshold", "ratio", "verdict"],
                                _target_rows(report["targets"])))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write(path, (json.dumps(report, indent=2, default=str) + "\n").encode(), 0o644)


def charts(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG charts (matplotlib, Agg backend); an empty list when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    colours = {"agent": "#1f77b4", "local": "#7f7f7f", "edge3": "#d62728"}
    written: list[Path] = []

    def bars(ax: Any, scenario: str, fields: list[tuple[str, str]], ylabel: str, title: str) -> None:
        rows = [r for r in results if r["scenario"] == scenario]
        width = 0.8 / max(len(fields), 1)
        for i, row in enumerate(rows):
            for j, (field, label) in enumerate(fields):
                value = row.get(field)
                if value is None:
                    continue
                x = i + (j - (len(fields) - 1) / 2) * width
                ax.bar(x, value, width * 0.95, color=colours[row["key"]], alpha=1.0 - 0.45 * j,
                       label=label if i == 0 else None)
                ax.annotate(f"{value:.0f}" if value >= 10 else f"{value:.1f}", (x, value), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [EXECUTOR_NAMES[r["key"]] for r in rows], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if len(fields) > 1:
            ax.legend(fontsize=8)

    specs = [
        ("dispatch.png", "dispatch", [("dispatch_ms_median", "median"), ("dispatch_ms_p95", "p95")],
         "ms", "Dispatch latency, queued -> running (few tasks, free slots)"),
        ("makespan.png", "makespan", [("makespan_s", "makespan")],
         "s", f"Makespan of {report['meta']['options'].get('trivial_tasks')} independent trivial tasks"),
        ("memory.png", "memory", [("pss_per_task_mb", "PSS per running task"), ("idle_rss_mb", "idle RSS, main process")],
         "MB", f"Memory, {report['meta']['options'].get('sleep_tasks')} sleeping tasks"),
    ]
    for name, scenario, fields, ylabel, title in specs:
        if not any(r["scenario"] == scenario for r in results):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        bars(ax, scenario, fields, ylabel, title)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    gateway = report.get("gateway")
    if gateway and gateway.get("wake_ms"):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        ax.hist(gateway["wake_ms"], bins=30, color=colours["agent"])
        ax.axvline(WAKE_MS_MAX, color="black", linestyle="--", linewidth=1, label="target 100 ms")
        ax.set_xlabel("ms from the job's commit to the right client holding it")
        ax.set_ylabel("wake-ups")
        ax.set_title(f"Gateway wake-up with {gateway.get('clients')} long-polling agents", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "gateway.png")
        plt.close(fig)
        written.append(out_dir / "gateway.png")
    return written


def render_markdown(report: dict[str, Any], chart_paths: list[Path], doc_path: Path) -> str:
    meta = report["meta"]
    opts = meta["options"]
    summary = (
        f"Run of {meta['finished_at']} (commit `{meta.get('commit', '?')}`), {meta['duration_s'] / 60:.0f} min: "
        f"{meta['cpus']} CPUs, {meta['memory_gb']:.0f} GB, load average {meta.get('loadavg_start')} at the start "
        f"and {meta.get('loadavg_end')} at the end; "
        f"database {meta['database']}; Airflow {meta['versions'].get('apache-airflow')}, "
        f"edge3 {meta['versions'].get('apache-airflow-providers-edge3') or 'not installed'}; "
        f"{opts['rounds']} round(s), executors alternating; {opts['concurrency']} slots per executor."
    )
    lines = [
        summary,
        "",
        "Command: `" + meta["command"] + "`",
        "",
        markdown_table([h for h, _, _ in RESULT_COLUMNS], _rows(report["results"])),
        "",
    ]
    if _breakdown_rows(report["results"]):
        intro = ("Where a makespan run's time and CPU go (medians; CPU seconds per task by part of the "
                 "deployment, milliseconds per task by step; see bench/README.md for the definitions):")
        lines += [intro, "",
                  markdown_table(BREAKDOWN_HEADERS, _breakdown_rows(report["results"])), ""]
    if report.get("targets"):
        lines += ["Targets (ratios from this run):", "",
                  markdown_table(["target", "measured", "threshold", "ratio", "verdict"],
                                 _target_rows(report["targets"])), ""]
    if report.get("gateway"):
        lines += ["Gateway long-poll test:", "",
                  markdown_table(["", "value"], _gateway_rows(report["gateway"])), ""]
    for path in chart_paths:
        rel = os.path.relpath(path, doc_path.parent)
        lines.append(f"![{path.stem}]({rel})")
    return "\n".join(lines).rstrip() + "\n"


def update_doc(doc_path: Path, generated: str) -> None:
    """Replace the generated block of ``doc_path`` (create the file with only that block if missing)."""
    block = f"{BEGIN}\n{generated}{END}"
    if doc_path.exists():
        text = doc_path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            text = head + block + tail
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = f"# Benchmarks\n\n{block}\n"
    atomic_write(doc_path, text.encode(), 0o644)


__all__ = [
    "BEGIN", "END", "build_results", "charts", "evaluate_targets", "render_markdown", "render_text",
    "update_doc", "write_json",
]
