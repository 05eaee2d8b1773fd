"""The disk spool: per job, everything the gateway has not acknowledged yet, so no report is lost.

``<state_dir>/spool/<job_id>.json`` (0600, written atomically: a crash leaves the old or the new
record, never half of one) holds one :class:`SpoolEntry`: whether the RUNNING report is still to
be sent, the task log's path and the byte cursor the gateway acknowledged, and, once the task
ended, its final state (exit code, reason, or the local policy's refusal). The log shipper
(``logship.py``) and the agent's runtime callbacks write through it at every transition and every
acknowledged log chunk; the record is deleted when the final report was delivered, or when the
gateway says the job is not this agent's any more.

Why: a gateway outage (or an agent restart during one) must not lose a state report or a log
chunk. ``edge-agent run`` loads the spool at start and replays each job in order (RUNNING, the log
from the cursor on, the final state) before it leases anything; replayed jobs hold no task slot.

A record that cannot be read (a bug, a disk error, an edit) is moved aside to ``<name>.corrupt``
with an error line: the agent starts anyway, and the file stays for a human to look at.

A record that creates an obligation (the task started: RUNNING is owed; it ended: the final state
is owed) is written durably (file and directory fsynced). Progress on an obligation (the RUNNING
report acknowledged, the log cursor moving while the task runs) is written without fsync: losing
it to a power cut only makes the next start resend what the gateway already has, which it
deduplicates, and it spares the log shipper two fsyncs per log chunk.

Writes are versioned per job (``seq``) so two threads saving the same job (the runtime's reader at
exit, the log shipper at a chunk) cannot leave the older state on disk, and a record deleted
(delivered) is not brought back by a save that raced with the delete. Nothing secret is stored:
no workload, no task token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edge_agent.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
FORMAT_VERSION = 1
CORRUPT_SUFFIX = ".corrupt"
#: A job id used as a file name as is; anything else (never seen from our gateway) is hashed, so a
#: hostile or odd id can never name a path outside the spool.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Delivered jobs remembered against racing saves; a race is over in milliseconds, so the most
#: recent ones suffice, and the control process's memory stays flat over millions of jobs.
_TOMBSTONES = 4096


@dataclass(frozen=True)
class SpoolEntry:
    """One job's undelivered reports. ``running_reported`` False with ``started_at`` set = RUNNING pending."""

    job_id: str
    fencing: int
    #: The agent that held the lease (a re-registered agent's gateway answers 404 for it).
    agent_id: str
    # The task instance, for display and the audit log.
    queue: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    bundle: str | None
    #: ``hosted`` or ``local`` (no log chunk, no reason text leaves the machine for ``local``).
    log_policy: str
    leased_at: str
    #: First time this job was spooled: replay goes oldest first.
    spooled_at: str
    started_at: str | None = None
    pid: int | None = None
    running_reported: bool = False
    log_file: str | None = None
    #: Bytes of ``log_file`` the gateway acknowledged.
    log_offset: int = 0
    reason_logged: bool = False
    exited: bool = False
    exit_code: int | None = None
    reason: str | None = None
    #: Why the local policy refused the job (reported as REFUSED; it never ran).
    refused: str | None = None

    def pending(self) -> list[str]:
        """What is still to deliver, in order (for humans and logs)."""
        out = []
        if self.refused is not None:
            return ["refused"]
        if self.started_at is not None and not self.running_reported:
            out.append("running")
        if self.log_file is not None and self.log_policy != "local":
            out.append(f"log from byte {self.log_offset}")
        if self.exited:
            out.append("final state")
        return out

    def to_json(self, seq: int) -> bytes:
        body = {"v": FORMAT_VERSION, "seq": seq, **asdict(self)}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "tuple[SpoolEntry, int]":
        """Parse a record into (entry, seq); raises ValueError for anything that is not a record of this format."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("v") != FORMAT_VERSION:
            raise ValueError(f"not a spool record of format {FORMAT_VERSION}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in raw:
                values[f.name] = raw[f.name]
            elif f.default is MISSING:
                raise ValueError(f"field {f.name!r} is missing")
        entry = cls(**values)
        entry._check()
        seq = raw.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError("field 'seq' is missing or not a number")
        return entry, seq

    def _check(self) -> None:
        def want(name: str, kinds: tuple[type, ...], optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")

        for name in ("job_id", "agent_id", "queue", "dag_id", "task_id", "run_id", "log_policy", "leased_at",
                     "spooled_at"):
            want(name, (str,))
        for name in ("fencing", "map_index", "try_number", "log_offset"):
            want(name, (int,))
        for name in ("running_reported", "reason_logged", "exited"):
            want(name, (bool,))
        for name in ("bundle", "started_at", "log_file", "reason", "refused"):
            want(name, (str,), optional=True)
        for name in ("pid", "exit_code"):
            want(name, (int,), optional=True)
        if not self.job_id or self.log_offset < 0:
            raise ValueError("empty job id or negative log offset")
        if self.log_policy not in ("hosted", "local"):
            raise ValueError(f"unknown log policy {self.log_policy!r}")


@dataclass(frozen=True)
class SpoolUsage:
    jobs: int
    bytes: int

    def as_dict(self) -> dict[str, int]:
        return {"jobs": self.jobs, "bytes": self.bytes}


def file_name(job_id: str) -> str:
    if _SAFE_NAME.match(job_id) and not job_id.endswith(CORRUPT_SUFFIX):
        return f"{job_id}.json"
    return "job-" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32] + ".json"


class Spool:
    """The spool directory of one agent. Thread-safe; :meth:`open` once (under the state-dir lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / SPOOL_DIR
        self._lock = threading.Lock()
        #: job id -> (fencing, seq) of the state on disk; a save with an older version is dropped.
        self._saved: dict[str, tuple[int, int]] = {}
        #: job id -> fencing of a delivered (deleted) record: a racing save must not bring it back.
        self._gone: OrderedDict[str, int] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._failing = False

    def open(self) -> list[tuple[SpoolEntry, int]]:
        """Create the directory (0700) and return the records found with their ``seq``, oldest first.

        Unreadable records are moved aside (``.corrupt``) and logged; leftovers of an interrupted
        write are removed. Never raises for a bad record; raises OSError if the directory itself
        cannot be created or listed.
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.dir, 0o700)
        entries: list[tuple[SpoolEntry, int]] = []
        with self._lock:
            for path in sorted(self.dir.iterdir()):
                name = path.name
                if name.startswith(".") and name.endswith(".tmp"):
                    # An atomic write cut short by a crash: the record it replaces is still there.
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                if not name.endswith(".json") or not path.is_file():
                    continue
                try:
                    data = path.read_bytes()
                    entry, seq = SpoolEntry.from_json(data)
                    if file_name(entry.job_id) != name:
                        raise ValueError(f"it holds job {entry.job_id!r}, not the one its name says")
                except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    self._set_aside(path, exc)
                    continue
                entries.append((entry, seq))
                self._saved[entry.job_id] = (entry.fencing, seq)
                self._sizes[entry.job_id] = len(data)
        entries.sort(key=lambda item: (item[0].spooled_at, item[0].job_id))
        return entries

    def _set_aside(self, path: Path, why: Exception) -> None:
        target = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, target)
        except OSError as exc:
            log.error("spool record %s is unreadable (%s) and could not be moved aside: %s", path, why, exc)
            return
        log.error("spool record %s is unreadable (%s): moved aside to %s; its reports are not replayed",
                  path, why, target.name)

    def save(self, entry: SpoolEntry, seq: int, *, durable: bool = True) -> bool:
        """Write ``entry`` unless a newer version is on disk or the job was delivered; False on a disk error.

        ``durable`` False skips the fsyncs (progress only, see the module docstring); the write is
        atomic either way.
        """
        version = (entry.fencing, seq)
        with self._lock:
            gone = self._gone.get(entry.job_id)
            if gone is not None and entry.fencing <= gone:
                return True  # delivered meanwhile: nothing left to keep
            saved = self._saved.get(entry.job_id)
            if saved is not None and saved >= version:
                return True  # a newer state is already on disk
            data = entry.to_json(seq)
            try:
                if durable:
                    atomic_write(self.dir / file_name(entry.job_id), data, 0o600)
                else:
                    _replace_quick(self.dir / file_name(entry.job_id), data)
            except OSError as exc:
                # The job goes on; only its reports are at risk if the agent stops before delivery.
                (log.debug if self._failing else log.error)(
                    "cannot write the spool record of job %s: %s", entry.job_id, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("spool records are written again")
            self._failing = False
            self._saved[entry.job_id] = version
            self._sizes[entry.job_id] = len(data)
            return True

    def delete(self, job_id: str, fencing: int) -> None:
        """Forget the job's record (its reports were delivered, or it is not ours any more)."""
        with self._lock:
            self._gone[job_id] = max(fencing, self._gone.pop(job_id, fencing))
            while len(self._gone) > _TOMBSTONES:
                self._gone.popitem(last=False)
            saved = self._saved.get(job_id)
            if saved is not None and saved[0] > fencing:
                return  # the file belongs to a newer lease of the same job
            self._saved.pop(job_id, None)
            self._sizes.pop(job_id, None)
            try:
                (self.dir / file_name(job_id)).unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                log.error("cannot delete the spool record of job %s: %s; it will be replayed (harmlessly) "
                          "at the next start", job_id, exc)
                return
            fsync_dir(self.dir)

    def usage(self) -> SpoolUsage:
        with self._lock:
            return SpoolUsage(jobs=len(self._sizes), bytes=sum(self._sizes.values()))


def _replace_quick(path: Path, data: bytes) -> None:
    """``atomic_write`` without the fsyncs: readers see the old or the new record, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def usage_on_disk(state_dir: Path) -> SpoolUsage | None:
    """What a stopped agent left in its spool (for ``edge-agent status``); None if it cannot be read."""
    folder = state_dir / SPOOL_DIR
    try:
        files = [p for p in folder.iterdir() if p.name.endswith(".json") and p.is_file()]
        return SpoolUsage(jobs=len(files), bytes=sum(p.stat().st_size for p in files))
    except FileNotFoundError:
        return SpoolUsage(jobs=0, bytes=0)
    except OSError:
        return None


__all__ = ["SPOOL_DIR", "Spool", "SpoolEntry", "SpoolUsage", "file_name", "usage_on_disk"]
