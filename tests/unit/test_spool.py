"""The disk spool on a real directory: round trip, permissions, corrupt records, versions, replay order."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from edge_agent.spool import CORRUPT_SUFFIX, SPOOL_DIR, Spool, SpoolEntry, file_name, usage_on_disk


def entry(job_id: str = "job-1", **changes: object) -> SpoolEntry:
    base = SpoolEntry(
        job_id=job_id, fencing=3, agent_id="ag_1", queue="default", dag_id="etl", task_id="load", run_id="r1",
        map_index=-1, try_number=2, bundle="dags-folder", log_policy="hosted",
        leased_at="2026-01-01T00:00:00+00:00", spooled_at="2026-01-01T00:00:01+00:00",
        started_at="2026-01-01T00:00:01+00:00", pid=4242, log_file="/var/log/x.log", log_offset=10,
    )
    return dataclasses.replace(base, **changes)


def test_round_trip_keeps_every_field_and_the_version(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.open() == []
    e = entry(exited=True, exit_code=1, reason="boom", reason_logged=True, running_reported=True)
    assert spool.save(e, 7)
    assert Spool(tmp_path).open() == [(e, 7)]
    assert e.pending() == ["log from byte 10", "final state"]
    assert entry().pending() == ["running", "log from byte 10"]
    assert entry(refused="not allowed", exited=True).pending() == ["refused"]
    assert entry(log_policy="local", exited=True).pending() == ["running", "final state"]


def test_records_are_0600_in_a_0700_directory_and_hold_no_workload(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry(), 1)
    assert stat.S_IMODE(os.stat(tmp_path / SPOOL_DIR).st_mode) == 0o700
    path = tmp_path / SPOOL_DIR / "job-1.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    body = json.loads(path.read_text())
    assert "workload" not in body and "token" not in json.dumps(body)
    assert [p.name for p in (tmp_path / SPOOL_DIR).iterdir()] == ["job-1.json"]  # no temp file left


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b"[1, 2]",
    json.dumps({"v": 99, "job_id": "bad"}).encode(),
    b"\xff\xfe garbage",
])
def test_a_corrupt_record_is_moved_aside_and_logged_never_fatal(tmp_path: Path, caplog, content: bytes) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry("good"), 1)
    bad = tmp_path / SPOOL_DIR / "bad.json"
    bad.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="edge_agent.spool"):
        loaded = Spool(tmp_path).open()
    assert [e.job_id for e, _ in loaded] == ["good"]
    assert not bad.exists() and (tmp_path / SPOOL_DIR / ("bad.json" + CORRUPT_SUFFIX)).read_bytes() == content
    assert any("bad.json" in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    # The corrupt file is not counted and not loaded again.
    assert usage_on_disk(tmp_path).jobs == 1  # type: ignore[union-attr]
    assert [e.job_id for e, _ in Spool(tmp_path).open()] == ["good"]


def test_wrong_field_types_and_a_record_under_another_name_are_corrupt(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    folder = tmp_path / SPOOL_DIR
    good = json.loads(entry("x").to_json(1))
    (folder / "types.json").write_text(json.dumps({**good, "job_id": "types", "log_offset": "10"}))
    (folder / "boolint.json").write_text(json.dumps({**good, "job_id": "boolint", "fencing": True}))
    (folder / "missing.json").write_text(json.dumps({k: v for k, v in good.items() if k != "fencing"} |
                                                    {"job_id": "missing"}))
    (folder / "policy.json").write_text(json.dumps({**good, "job_id": "policy", "log_policy": "elsewhere"}))
    (folder / "other-name.json").write_text(json.dumps(good))  # holds job "x"
    assert Spool(tmp_path).open() == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        n + ".json" + CORRUPT_SUFFIX for n in ("types", "boolint", "missing", "policy", "other-name"))


def test_an_older_version_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    assert spool.save(entry(exited=True, exit_code=0), 2)
    assert spool.save(entry(exited=False), 1)  # a slower thread's older snapshot
    ((loaded, seq),) = Spool(tmp_path).open()
    assert loaded.exited and seq == 2


def test_a_delivered_record_is_not_brought_back_but_a_new_lease_of_the_job_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry(), 1)
    spool.delete("job-1", 3)
    assert spool.save(entry(log_offset=99), 2)  # raced with the delete
    assert Spool(tmp_path).open() == []
    newer = entry(fencing=4)
    spool.save(newer, 1)
    spool.delete("job-1", 3)  # the old lease's late delete must not remove the new lease's record
    assert Spool(tmp_path).open() == [(newer, 1)]
    assert spool.usage().jobs == 1


def test_replay_order_is_oldest_first_and_leftover_temp_files_go(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry("b", spooled_at="2026-01-01T00:00:03+00:00"), 1)
    spool.save(entry("a", spooled_at="2026-01-01T00:00:05+00:00"), 1)
    spool.save(entry("c", spooled_at="2026-01-01T00:00:01+00:00"), 1)
    leftover = tmp_path / SPOOL_DIR / ".a.json.x1.tmp"
    leftover.write_bytes(b"{half")
    assert [e.job_id for e, _ in Spool(tmp_path).open()] == ["c", "b", "a"]
    assert not leftover.exists()


def test_usage_counts_jobs_and_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert usage_on_disk(tmp_path).as_dict() == {"jobs": 0, "bytes": 0}  # type: ignore[union-attr]
    spool.open()
    spool.save(entry("a"), 1)
    spool.save(entry("b"), 1)
    size = sum(p.stat().st_size for p in (tmp_path / SPOOL_DIR).iterdir())
    assert spool.usage().as_dict() == {"jobs": 2, "bytes": size}
    assert usage_on_disk(tmp_path) == spool.usage()
    spool.delete("a", 3)
    assert spool.usage().jobs == 1 and usage_on_disk(tmp_path).jobs == 1  # type: ignore[union-attr]


def test_odd_job_ids_never_name_a_path_outside_the_spool(tmp_path: Path) -> None:
    assert file_name("0f3e-11aa_b.c") == "0f3e-11aa_b.c.json"
    for odd in ("../../etc/passwd", ".hidden", "a/b", "x" * 200, "bad.json.corrupt", ""):
        name = file_name(odd)
        assert "/" not in name and not name.startswith(".") and name.endswith(".json"), odd
    spool = Spool(tmp_path)
    spool.open()
    spool.save(entry("../../escape"), 1)
    assert [p.parent for p in tmp_path.rglob("*.json")] == [tmp_path / SPOOL_DIR]
    assert [e.job_id for e, _ in Spool(tmp_path).open()] == ["../../escape"]


def test_a_write_error_is_reported_not_raised(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path)
    spool.open()
    folder = tmp_path / SPOOL_DIR
    folder.rmdir()
    folder.write_text("a file where the directory should be")  # fails for root too, unlike chmod
    with caplog.at_level(logging.ERROR, logger="edge_agent.spool"):
        assert spool.save(entry(), 1) is False
        assert spool.save(entry(), 2) is False
    errors = [r for r in caplog.records if "cannot write the spool record of job job-1" in r.getMessage()]
    assert len(errors) == 1  # one line per streak, not one per chunk
    folder.unlink()
    folder.mkdir()
    assert spool.save(entry(), 3) is True
    assert Spool(tmp_path).open() == [(entry(), 3)]


def test_a_progress_write_is_atomic_and_0600_too(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    assert spool.save(entry(log_offset=1), 1, durable=False)
    assert spool.save(entry(log_offset=2), 2, durable=False)
    path = tmp_path / SPOOL_DIR / "job-1.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Spool(tmp_path).open() == [(entry(log_offset=2), 2)]
    assert [p.name for p in (tmp_path / SPOOL_DIR).iterdir()] == ["job-1.json"]
