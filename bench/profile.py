"""Sample a running process tree with py-spy while a scenario runs; summarise where its CPU went.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); idle threads
are left out (py-spy's default), so the counts are CPU samples. The summary lists the functions
with the largest inclusive and self shares; the raw file stays next to the results for flame
graphs (``inferno-flamegraph`` or speedscope read it).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 50
TOP = 15
#: Frames on nearly every stack (entry points, event loops) say nothing: left out of the top list.
WRAPPER_SHARE = 90.0
#: Rough buckets of where a Python worker spends its samples (substring of any frame on the stack).
CATEGORIES = {
    "task SDK supervisor (supervise*)": ("supervise",),
    "fork of the task process (_fork_main)": ("_fork_main",),
    "module imports (_find_and_load)": ("_find_and_load",),
    "DAG file parsing": ("_load_modules_from_file", "DagBag.", "BundleDagBag", "process_file", "parse_dag", "get_dag"),
    "TLS context set-up (create_default_context, load_verify_locations, load_default_certs)": (
        "create_default_context", "load_verify_locations", "load_default_certs"),
    "httpx": ("httpx/",),
    "database (psycopg, sqlalchemy)": ("psycopg/", "sqlalchemy/"),
    "logging (structlog, logging)": ("structlog/", "logging/"),
    "pydantic": ("pydantic",),
}


class PySpy:
    def __init__(self, proc: subprocess.Popen[bytes] | None, output: Path, reason: str = "") -> None:
        self.proc = proc
        self.output = output
        self.reason = reason

    @classmethod
    def start(cls, pid: int, output: Path, *, duration: float = 600.0) -> PySpy:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            return cls(None, output, "py-spy is not installed (pip install -e '.[bench]')")
        output.parent.mkdir(parents=True, exist_ok=True)
        log = output.with_suffix(".log").open("wb")
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", str(RATE_HZ),
             "--duration", str(int(duration)), "--nonblocking", "--output", str(output)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return cls(proc, output)

    def finish(self) -> dict[str, Any]:
        """Stop sampling (py-spy writes its file on SIGINT) and summarise it."""
        if self.proc is None:
            return {"error": self.reason}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.output.exists():
            return {"error": f"py-spy wrote nothing (see {self.output.with_suffix('.log')})"}
        return summarise(self.output)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)": keep function and file, drop the line.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(where.split("/")[-2:]) if where else ""
    return f"{name} ({short})" if short else name


def summarise(path: Path, top: int = TOP) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        for label, needles in CATEGORIES.items():
            if any(needle in stack for needle in needles):
                categories[label] += count
        for name in set(frames[1:]):  # the first frame is the process/thread label
            inclusive[name] += count
        self_time[frames[-1]] += count
    share = lambda n: round(100.0 * n / total, 1) if total else 0.0
    return {
        "file": str(path),
        "samples": total,
        "categories_pct": {label: share(categories[label]) for label in CATEGORIES},
        "top_inclusive_pct": [[name, share(n)] for name, n in inclusive.most_common()
                              if share(n) < WRAPPER_SHARE][:top],
        "top_self_pct": [[name, share(n)] for name, n in self_time.most_common(top)],
    }


__all__ = ["PySpy", "summarise"]
