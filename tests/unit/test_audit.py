"""The audit log: chained appends on real files, restarts, and detection of every kind of tampering."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.audit import AUDIT_FILE, HEAD_FILE, AuditLog, entry_hash, genesis_hash, verify
from edge_agent.cli import app


def fill(state: Path, n: int = 5, agent_id: str = "ag_1") -> Path:
    audit = AuditLog.open(state, agent_id)
    for i in range(n):
        audit.append("decision", job_id=f"j{i}", decision="accepted", reason="no local policy", queue="q",
                     ti={"dag_id": "d", "task_id": f"t{i}", "run_id": "r", "map_index": -1, "try_number": 1})
    audit.close()
    return state / AUDIT_FILE


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def problems(state: Path) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in verify(state).problems]


def test_entries_are_chained_and_private(tmp_path: Path) -> None:
    path = fill(tmp_path, 3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / HEAD_FILE).stat().st_mode) == 0o600
    entries = [json.loads(line) for line in lines(path)]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == genesis_hash("ag_1")
    for after, raw in zip(entries[1:], lines(path)[:-1], strict=True):
        assert after["prev"] == hashlib.sha256(raw.rstrip(b"\n")).hexdigest()
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert entries[1]["job_id"] == "j1" and entries[1]["ti"]["task_id"] == "t1" and entries[1]["time"].endswith("Z")
    result = verify(tmp_path)
    assert result.ok and result.entries == 3 and result.first_bad_line is None


def test_a_restart_continues_the_chain(tmp_path: Path) -> None:
    fill(tmp_path, 2)
    fill(tmp_path, 2)
    assert [json.loads(x)["seq"] for x in lines(tmp_path / AUDIT_FILE)] == [1, 2, 3, 4]
    assert verify(tmp_path).ok


def test_a_stop_between_the_line_and_the_head_is_not_tampering(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    head = tmp_path / HEAD_FILE
    saved = head.read_bytes()
    fill(tmp_path, 1)
    head.write_bytes(saved)  # the head lags one entry behind, as after a crash between the two writes
    assert verify(tmp_path).ok
    fill(tmp_path, 1)  # reopening accepts it without a chain break
    assert verify(tmp_path).ok


# -- tampering -------------------------------------------------------------------------------------


def test_an_edited_byte_is_found(tmp_path: Path) -> None:
    path = fill(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(b'"t2"') + 2
    data[at] = ord("X")  # "t2" -> "tX"
    path.write_bytes(bytes(data))
    assert problems(tmp_path)[0] == (3, "edited")
    assert verify(tmp_path).first_bad_line == 3


def test_an_edit_that_breaks_the_json_is_found(tmp_path: Path) -> None:
    path = fill(tmp_path)
    rows = lines(path)
    rows[1] = rows[1].replace(b"{", b"[", 1)
    path.write_bytes(b"".join(rows))
    assert problems(tmp_path)[0] == (2, "unreadable")


def test_an_edit_with_a_recomputed_hash_still_breaks_the_next_link(tmp_path: Path) -> None:
    path = fill(tmp_path)
    rows = lines(path)
    entry = json.loads(rows[1])
    entry["decision"] = "refused"
    entry["hash"] = entry_hash(entry)
    rows[1] = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    path.write_bytes(b"".join(rows))
    assert problems(tmp_path) == [(3, "broken_link")]


@pytest.mark.parametrize(("index", "kind", "line"), [(2, "removed", 3), (0, "removed", 1)])
def test_a_removed_line_is_found(tmp_path: Path, index: int, kind: str, line: int) -> None:
    path = fill(tmp_path)
    rows = lines(path)
    del rows[index]
    path.write_bytes(b"".join(rows))
    assert problems(tmp_path)[0] == (line, kind)


def test_a_removed_last_line_is_found_through_the_head(tmp_path: Path) -> None:
    path = fill(tmp_path)
    path.write_bytes(b"".join(lines(path)[:-2]))
    found = verify(tmp_path)
    assert [(p.line, p.kind) for p in found.problems] == [(4, "truncated")]
    assert "records 5 entries but the log ends at entry 3" in found.problems[0].detail


def test_swapped_lines_are_found(tmp_path: Path) -> None:
    path = fill(tmp_path)
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_bytes(b"".join(rows))
    assert problems(tmp_path)[0] == (2, "reordered")


def test_a_cut_in_the_middle_of_a_line_is_found(tmp_path: Path) -> None:
    path = fill(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    assert (5, "truncated") in problems(tmp_path)
    assert verify(tmp_path).first_bad_line == 5


def test_a_deleted_head_or_log_is_found(tmp_path: Path) -> None:
    fill(tmp_path)
    (tmp_path / HEAD_FILE).unlink()
    assert problems(tmp_path) == [(6, "truncated")]
    (tmp_path / "other").mkdir()
    fill(tmp_path / "other", 2)
    (tmp_path / "other" / AUDIT_FILE).unlink()
    assert problems(tmp_path / "other") == [(1, "truncated")]
    assert verify(tmp_path / "nothing").ok  # never written: nothing to check


# -- the agent notices at start --------------------------------------------------------------------


def test_tampering_noticed_at_start_is_recorded_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = fill(tmp_path)
    kept = b"".join(lines(path)[:-1])
    path.write_bytes(kept)  # the last entry removed
    with caplog.at_level(logging.ERROR):
        fill(tmp_path, 1)
    assert "AUDIT LOG" in caplog.text and "TAMPERED" in caplog.text
    rows = lines(path)
    assert b"".join(rows).startswith(kept)  # the evidence stays as it was
    brk = json.loads(rows[4])
    assert brk["event"] == "chain_break" and brk["seq"] == 5
    assert "records entry 5 as the last, but the log ends with entry 4" in brk["reason"]
    assert json.loads(rows[5])["seq"] == 6
    # The chain is intact after the break, but the log never verifies clean again.
    assert problems(tmp_path) == [(5, "chain_break")]


def test_a_torn_last_line_is_closed_before_the_break(tmp_path: Path) -> None:
    path = fill(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    fill(tmp_path, 1)
    rows = lines(path)
    assert all(row.endswith(b"\n") for row in rows)
    assert json.loads(rows[5])["event"] == "chain_break" and "incomplete" in json.loads(rows[5])["reason"]
    assert problems(tmp_path) == [(5, "unreadable"), (6, "chain_break")]


def test_an_edited_last_line_is_noticed_at_start(tmp_path: Path) -> None:
    path = fill(tmp_path)
    rows = lines(path)
    rows[-1] = rows[-1].replace(b"accepted", b"refused!")
    path.write_bytes(b"".join(rows))
    fill(tmp_path, 1)
    assert problems(tmp_path) == [(5, "edited"), (6, "chain_break")]


# -- the command ------------------------------------------------------------------------------------


def test_verify_command(tmp_path: Path) -> None:
    runner = CliRunner()
    path = fill(tmp_path)
    ok = runner.invoke(app, ["audit", "verify", "--state-dir", str(tmp_path)])
    assert ok.exit_code == 0 and "OK, 5 entries" in ok.stdout
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_bytes(b"".join(rows))
    bad = runner.invoke(app, ["audit", "verify", "--state-dir", str(tmp_path)], terminal_width=200)
    assert bad.exit_code == 1 and "FAILED at line 2" in bad.stdout and "line 2: reordered" in bad.stdout
    report = json.loads(runner.invoke(app, ["audit", "verify", "--state-dir", str(tmp_path), "--json"]).stdout)
    assert report["ok"] is False and report["first_bad_line"] == 2 and report["problems"][0]["kind"] == "reordered"
