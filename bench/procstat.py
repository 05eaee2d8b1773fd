"""Memory and CPU of processes and process trees, read from ``/proc`` (Linux only).

* PSS (proportional set size) from ``/proc/PID/smaps_rollup``: shared pages are divided among
  the processes that map them, so the PSS of a tree does not count copy-on-write pages of a
  forked parent once per child (summed RSS does, and overstates a forking worker many times).
* RSS from ``/proc/PID/status`` (``VmRSS``).
* CPU time from ``/proc/PID/stat`` (utime + stime, in clock ticks).

A process that exits between listing and reading is skipped: trees change while tasks run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The agent's own map of the process table (parent pid -> its children), the one kill_tree walks.
from edge_agent.runtime import _process_children as _children_map

_TICKS = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants alive now (root first)."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` alive now."""
    return sorted(_children_map().get(pid, ()))


def _field_kb(path: str, field: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kb(pid: int) -> int | None:
    return _field_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def rss_kb(pid: int) -> int | None:
    return _field_kb(f"/proc/{pid}/status", "VmRSS:")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far (not its children's)."""
    rest = _stat_fields(pid)
    if rest is None:
        return None
    # After comm: state(3) ppid(4) ... utime is field 14, stime 15 (1-based) -> rest[11], rest[12].
    return (int(rest[11]) + int(rest[12])) / _TICKS


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root``'s tree: every live member's own time plus that of the children it has
    reaped (``cutime``/``cstime``), so processes that ran and exited inside the tree (a task and
    its supervisor) are counted too, as long as a tree member waited for them."""
    total = 0
    for pid in tree_pids(root):
        rest = _stat_fields(pid)
        if rest is None:
            continue
        # utime, stime, cutime, cstime: fields 14-17 (1-based) -> rest[11:15].
        total += sum(int(v) for v in rest[11:15])
    return total / _TICKS


@dataclass(frozen=True)
class TreeMemory:
    pids: int
    pss_mb: float
    rss_mb: float


def tree_memory(root: int) -> TreeMemory:
    """Summed PSS and RSS of ``root``'s tree."""
    pids = tree_pids(root)
    pss = sum(v for v in map(pss_kb, pids) if v is not None)
    rss = sum(v for v in map(rss_kb, pids) if v is not None)
    return TreeMemory(pids=len(pids), pss_mb=pss / 1024, rss_mb=rss / 1024)


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    # Per-task titles ("edge-agent supervisor: dag.task <uuid>", "airflow worker -- <uuid>")
    # differ per task: keep the kind.
    return text.split(":")[0].split(" -- ")[0][:60] or "?"


def pss_by_kind(root: int) -> dict[str, dict[str, float]]:
    """PSS of ``root``'s tree grouped by command line (up to a ':' or 60 characters): count and MB."""
    out: dict[str, dict[str, float]] = {}
    for pid in tree_pids(root):
        pss = pss_kb(pid)
        if pss is None:
            continue
        entry = out.setdefault(_kind(pid), {"count": 0, "pss_mb": 0.0})
        entry["count"] += 1
        entry["pss_mb"] = round(entry["pss_mb"] + pss / 1024, 1)
    return out


def open_sockets(pid: int) -> int:
    """How many sockets the process holds open (fd targets named ``socket:[...]``)."""
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


__all__ = ["TreeMemory", "children", "cpu_seconds", "open_sockets", "pss_by_kind", "pss_kb", "rss_kb", "tree_cpu_seconds", "tree_memory",
           "tree_pids"]
