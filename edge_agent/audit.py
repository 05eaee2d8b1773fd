"""The local audit log: a hash-chained, append-only record of every job this agent accepted, refused and finished.

``<state dir>/audit.log`` (0600) holds one JSON object per line, written with ``O_APPEND`` and
fsynced before the job goes on. Each entry carries ``seq`` (1, 2, ...), ``prev`` (SHA-256 of the
previous line's bytes; for the first line, of a genesis string naming the agent) and ``hash``
(SHA-256 of the entry's canonical JSON without ``hash``). ``audit.head`` (0600, replaced atomically
after each append) remembers the last ``seq`` and the SHA-256 of the last line, so removing lines
from the end is noticed too, which a chain alone cannot show.

What :func:`verify` detects, and the kind it reports: a changed byte (``edited``, or ``unreadable``
when the JSON breaks), a removed line (``removed``), swapped lines (``reordered``), a cut in the
middle of a line or lines cut from the end (``truncated``), and any entry whose ``prev`` does not
match the line before it (``broken_link``). Someone who can rewrite the whole file *and* the head
can forge a consistent history: this log makes tampering visible, it does not make it impossible.

At start the agent checks the last line and the head (cheap, whatever the log's size; a full check
is ``edge-agent audit verify``). If they do not agree it logs a loud warning and appends a
``chain_break`` entry saying what it found, then carries on: the damaged lines stay as evidence,
and ``verify`` keeps failing on them and on the ``chain_break`` line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_agent.errors import AuditError, ConfigError
from edge_agent.fsutil import atomic_write

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
HEAD_FILE = "audit.head"
FORMAT_VERSION = 1
#: The last bytes read at start to find the last line; a longer line is itself a sign of damage.
_TAIL_BYTES = 1 << 20


def genesis_hash(agent_id: str) -> str:
    """``prev`` of the first entry: binds the log to the agent that started it."""
    return _sha(f"edge-agent audit log v{FORMAT_VERSION}; genesis; agent {agent_id}".encode())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """The ``hash`` an entry must carry: SHA-256 of its canonical JSON without ``hash``."""
    return _sha(_canonical({k: v for k, v in entry.items() if k != "hash"}))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends chained entries to ``audit.log``; one instance per process, thread-safe.

    Open it only while holding the state directory's lock (``statelock``): two writers would both
    chain onto the same line.
    """

    def __init__(self, state_dir: Path, agent_id: str) -> None:
        self.path = Path(state_dir) / AUDIT_FILE
        self.head_path = Path(state_dir) / HEAD_FILE
        self.agent_id = agent_id
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._prev = genesis_hash(agent_id)

    @classmethod
    def open(cls, state_dir: Path, agent_id: str) -> "AuditLog":
        """Open for appending, check the end of the log against the head, record a break if they disagree."""
        audit = cls(state_dir, agent_id)
        audit._open()
        return audit

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from None
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)  # a log of which jobs ran is for the agent's operator only
        self._fd = fd
        problem, seq, prev, torn = self._check_tail(fd)
        self._seq, self._prev = seq, prev
        if problem is not None:
            log.error("AUDIT LOG %s IS DAMAGED OR WAS TAMPERED WITH: %s; keeping it as evidence and starting a new "
                      "chain segment (see 'edge-agent audit verify')", self.path, problem)
            if torn:
                # End the torn line so the break entry is a line of its own.
                self._write(b"\n")
                self._prev = _sha(torn)
            self.append("chain_break", reason=problem)

    def _check_tail(self, fd: int) -> tuple[str | None, int, str, bytes]:
        """(problem, last seq, prev for the next entry, torn last line bytes or b'')."""
        size = os.fstat(fd).st_size
        head = _read_head(self.head_path)
        if size == 0:
            if head is not None and head.get("seq", 0) > 0:
                return (f"the log is empty but {HEAD_FILE} records {head.get('seq')} entries (truncated or replaced)",
                        0, genesis_hash(self.agent_id), b"")
            return None, 0, genesis_hash(self.agent_id), b""
        start = max(0, size - _TAIL_BYTES)
        tail = os.pread(fd, size - start, start)
        if not tail.endswith(b"\n"):
            torn = tail.rsplit(b"\n", 1)[-1]
            seq = _last_seq(tail[: len(tail) - len(torn)])
            return f"the last line is incomplete ({len(torn)} bytes without a newline: truncated)", seq, "", torn
        lines = tail[:-1].split(b"\n")
        last = lines[-1]
        if start > 0 and len(lines) == 1:
            return "the last line is longer than any entry this agent writes", 0, _sha(last), b""
        try:
            entry = json.loads(last)
            seq = int(entry["seq"])
            ok = entry.get("hash") == entry_hash(entry)
        except (ValueError, KeyError, TypeError):
            return "the last line is not a readable entry (edited)", _last_seq(tail[: -len(last) - 1]), _sha(last), b""
        if not ok:
            return f"entry {seq} (the last line) does not match its hash (edited)", seq, _sha(last), b""
        if head is None:
            return f"{HEAD_FILE} is missing, so lines removed from the end cannot be ruled out", seq, _sha(last), b""
        head_seq, head_line = head.get("seq"), head.get("line_sha256")
        if head_seq == seq and head_line == _sha(last):
            return None, seq, _sha(last), b""
        if head_seq == seq - 1 and head_line == entry.get("prev"):
            # The agent stopped between appending the line and updating the head: the log is whole.
            return None, seq, _sha(last), b""
        return (f"{HEAD_FILE} records entry {head_seq} as the last, but the log ends with entry {seq} "
                "(lines removed from the end, or the log replaced)", seq, _sha(last), b"")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry and fsync it; raises :class:`AuditError` if it could not be written."""
        with self._lock:
            if self._fd is None:
                raise AuditError(f"the audit log {self.path} is closed")
            entry: dict[str, Any] = {
                "v": FORMAT_VERSION,
                "seq": self._seq + 1,
                "time": _now(),
                "event": event,
                "agent_id": self.agent_id,
                **{k: v for k, v in fields.items() if v is not None},
                "prev": self._prev,
            }
            entry["hash"] = entry_hash(entry)
            line = _canonical(entry)
            try:
                self._write(line + b"\n")
            except OSError as exc:
                raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}") from None
            self._seq += 1
            self._prev = _sha(line)
            try:
                head = json.dumps({"seq": self._seq, "line_sha256": self._prev}).encode() + b"\n"
                atomic_write(self.head_path, head, 0o600)
            except OSError as exc:
                # The entry itself is on disk; a stale head only weakens the check for a cut tail.
                log.warning("could not update %s: %s", self.head_path, exc)
            return entry

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _read_head(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_seq(text: bytes) -> int:
    """The ``seq`` of the last readable line of ``text`` (0 if none)."""
    for line in reversed(text.rstrip(b"\n").split(b"\n")):
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


# -- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    kind: str
    detail: str


@dataclass
class Verification:
    path: Path
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)
    first_time: str | None = None
    last_time: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_line(self) -> int | None:
        return min((p.line for p in self.problems), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_line": self.first_bad_line,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "problems": [{"line": p.line, "kind": p.kind, "detail": p.detail} for p in self.problems],
        }


def verify(state_dir: Path) -> Verification:
    """Check the whole chain and the head; every problem is reported with its 1-based line number."""
    path = Path(state_dir) / AUDIT_FILE
    result = Verification(path=path)
    head = _read_head(Path(state_dir) / HEAD_FILE)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if head is not None and head.get("seq", 0) > 0:
            result.problems.append(Problem(1, "truncated", f"the log is missing but {HEAD_FILE} records "
                                                          f"{head.get('seq')} entries (deleted)"))
        return result
    except OSError as exc:
        raise ConfigError(f"cannot read the audit log {path}: {exc.strerror or exc}") from None
    if not data:
        if head is not None and head.get("seq", 0) > 0:
            result.problems.append(Problem(1, "truncated", f"the log is empty but {HEAD_FILE} records "
                                                          f"{head.get('seq')} entries"))
        return result

    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    entries = [_parse(raw) for raw in lines]
    present = {e["seq"] for e in entries if e is not None and isinstance(e.get("seq"), int)}
    prev_sha: str | None = None  # SHA-256 of the previous line's bytes; None before the first line
    prev_seq: int | None = 0  # None after an unreadable line: its seq is unknown, resynchronise
    last_seq = 0
    where: dict[int, tuple[int, str]] = {}  # seq -> (line number, SHA-256 of the line)
    for number, (raw, entry) in enumerate(zip(lines, entries, strict=True), start=1):
        if entry is None:
            result.problems.append(Problem(number, "unreadable", "not a JSON entry (edited, or a torn write)"))
            prev_sha, prev_seq = _sha(raw), None
            continue
        result.entries += 1
        seq = entry.get("seq") if isinstance(entry.get("seq"), int) else -1
        result.first_time = result.first_time or entry.get("time")
        result.last_time = entry.get("time") or result.last_time
        if entry.get("hash") != entry_hash(entry):
            result.problems.append(Problem(number, "edited", f"entry {seq} does not match its hash"))
        if prev_seq is not None and seq != prev_seq + 1:
            result.problems.append(_sequence_problem(number, seq, prev_seq, present))
        else:
            expected = prev_sha if prev_sha is not None else genesis_hash(str(entry.get("agent_id")))
            if entry.get("prev") != expected:
                what = "the genesis of its agent" if prev_sha is None else "the line before it"
                result.problems.append(Problem(number, "broken_link", f"entry {seq} does not chain onto {what}"))
        if entry.get("event") == "chain_break":
            result.problems.append(Problem(number, "chain_break", f"the agent found the log damaged at "
                                                                  f"{entry.get('time')}: {entry.get('reason')}"))
        where[seq] = (number, _sha(raw))
        prev_sha, prev_seq = _sha(raw), seq
        last_seq = max(last_seq, seq)
    end = len(lines) + 1  # where missing lines at the end would be
    if torn:
        result.problems.append(Problem(end, "truncated", f"the last line is incomplete ({len(torn)} bytes "
                                                         "without a newline)"))
    result.problems.extend(_head_problems(head, where, last_seq, end))
    result.problems.sort(key=lambda p: p.line)
    return result


def _sequence_problem(number: int, seq: int, prev_seq: int, present: set[int]) -> Problem:
    if seq <= prev_seq:
        return Problem(number, "reordered", f"entry {seq} comes after entry {prev_seq}")
    missing = range(prev_seq + 1, seq)
    if all(s in present for s in missing):
        return Problem(number, "reordered", f"entry {seq} comes before entry {prev_seq + 1}")
    after = "at the start" if prev_seq == 0 else f"after entry {prev_seq}"
    return Problem(number, "removed", f"{len(missing)} entr{'y' if len(missing) == 1 else 'ies'} missing {after}")


def _head_problems(head: dict[str, Any] | None, where: dict[int, tuple[int, str]], last_seq: int,
                   end: int) -> list[Problem]:
    """Compare the log with ``audit.head``, the agent's note of the last entry it wrote."""
    if head is None:
        return [Problem(end, "truncated", f"{HEAD_FILE} is missing, so lines removed from the end cannot be "
                                          "ruled out")]
    head_seq, head_line = head.get("seq"), head.get("line_sha256")
    if not isinstance(head_seq, int):
        return [Problem(end, "truncated", f"{HEAD_FILE} is unreadable")]
    if head_seq not in where:
        if head_seq > last_seq:
            return [Problem(end, "truncated", f"{HEAD_FILE} records {head_seq} entries but the log ends at entry "
                                              f"{last_seq}: lines were removed from the end")]
        return [Problem(end, "edited", f"entry {head_seq}, the last one recorded in {HEAD_FILE}, is not in the log")]
    number, line_sha = where[head_seq]
    if line_sha != head_line:
        return [Problem(number, "edited", f"entry {head_seq} is not the line the agent wrote ({HEAD_FILE} "
                                          "records another)")]
    if last_seq > head_seq + 1:
        # The agent updates the head after every append; at most one entry can be ahead of it (a stop
        # between the two writes).
        return [Problem(where[head_seq + 1][0] if head_seq + 1 in where else end, "appended",
                        f"{last_seq - head_seq} entries follow entry {head_seq}, the last one the agent recorded "
                        f"in {HEAD_FILE}")]
    return []


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


__all__ = ["AUDIT_FILE", "HEAD_FILE", "AuditError", "AuditLog", "Problem", "Verification", "entry_hash",
           "genesis_hash", "verify"]
