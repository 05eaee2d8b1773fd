"""Keystore.save_rotated: a crash at any write leaves a usable key/certificate pair, old or new."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import keyring
import keyring.errors
import pytest
import trustme

from edge_agent.errors import ConfigError
from edge_agent.identity import keystore as ks_mod
from edge_agent.identity.keystore import Keystore, StoredIdentity

ROTATION_FILES = {"rotation.json", "agent.key.next", "agent.pem.next"}


# The in-memory recommended backend of the key store's own tests (tests/unit is on sys.path).
from test_keystore import MemoryKeyring  # noqa: E402


@pytest.fixture()
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture(scope="module")
def pair() -> tuple[StoredIdentity, StoredIdentity]:
    ca, new_ca = trustme.CA(), trustme.CA()

    def ident(leaf: trustme.LeafCert, year: int, cas: tuple[str, ...]) -> StoredIdentity:
        return StoredIdentity(
            agent_id="ag_1", name="edge-1", queues=("q",), region="eu", url="https://gw.test",
            executor="x", cert_not_after=datetime(year, 1, 1, tzinfo=timezone.utc),
            cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=cas, key_pem=leaf.private_key_pem.bytes())

    old_pem, new_pem = ca.cert_pem.bytes().decode(), new_ca.cert_pem.bytes().decode()
    return (ident(ca.issue_cert("a.test"), 2030, (old_pem,)),
            ident(ca.issue_cert("a.test"), 2031, (old_pem, new_pem)))


def test_rotation_replaces_key_certificate_and_bundle(tmp_path: Path, pair) -> None:
    old, new = pair
    store = Keystore(tmp_path, "file")
    store.save(old)
    store.save_rotated(new)
    assert store.load() == new
    assert (tmp_path / "agent.key").read_bytes() == new.key_pem
    assert json.loads((tmp_path / "identity.json").read_text())["cert_not_after"].startswith("2031")
    assert not ROTATION_FILES & {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("fail_at", range(7))
def test_a_crash_at_any_write_leaves_a_matching_pair(tmp_path: Path, pair, monkeypatch, fail_at: int) -> None:
    old, new = pair
    store = Keystore(tmp_path, "file")
    store.save(old)
    real = ks_mod.atomic_write
    calls: list[str] = []

    def crashing(path: Path, data: bytes, mode: int = 0o600) -> None:
        calls.append(path.name)
        if len(calls) == fail_at + 1:
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(ks_mod, "atomic_write", crashing)
    with pytest.raises(OSError):
        store.save_rotated(new)
    monkeypatch.setattr(ks_mod, "atomic_write", real)
    # Before the commit point (staged key, staged cert, rotation.json) the old pair stays; after it
    # the next load finishes the rotation.
    expected = old if fail_at <= 2 else new
    assert Keystore(tmp_path, "file").load() == expected
    assert not {"rotation.json"} & {p.name for p in tmp_path.iterdir()}
    assert calls[fail_at] == ["agent.key.next", "agent.pem.next", "rotation.json", "agent.key", "agent.pem",
                              "ca.pem", "identity.json"][fail_at]


def test_keyring_rotation_and_crash(tmp_path: Path, pair, memory_keyring: MemoryKeyring, monkeypatch) -> None:
    old, new = pair
    store = Keystore(tmp_path, "keyring")
    store.save(old)
    real = ks_mod.atomic_write

    def crash_on_cert(path: Path, data: bytes, mode: int = 0o600) -> None:
        if path.name == "agent.pem":
            raise OSError(5, "I/O error")
        real(path, data, mode)

    monkeypatch.setattr(ks_mod, "atomic_write", crash_on_cert)
    with pytest.raises(OSError):
        store.save_rotated(new)  # the keyring already holds the new key, agent.pem still the old cert
    monkeypatch.setattr(ks_mod, "atomic_write", real)
    assert Keystore(tmp_path).load() == new
    assert list(memory_keyring.secrets.values()) == [new.key_pem.decode()]  # the staged entry is gone
    assert not (tmp_path / "agent.key").exists()


def test_a_new_registration_drops_a_pending_rotation(tmp_path: Path, pair, monkeypatch) -> None:
    old, new = pair
    store = Keystore(tmp_path, "file")
    store.save(new)
    real = ks_mod.atomic_write

    def crash_on_apply(path: Path, data: bytes, mode: int = 0o600) -> None:
        if path.name == "agent.key":
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(ks_mod, "atomic_write", crash_on_apply)
    with pytest.raises(OSError):
        store.save_rotated(new)
    monkeypatch.setattr(ks_mod, "atomic_write", real)
    assert (tmp_path / "rotation.json").exists()
    store.save(old)  # 'register --force' with another identity
    assert store.load() == old
    assert not ROTATION_FILES & {p.name for p in tmp_path.iterdir()}


def test_a_rotation_without_its_staged_files_says_re_register(tmp_path: Path, pair, monkeypatch) -> None:
    old, new = pair
    store = Keystore(tmp_path, "file")
    store.save(old)
    real = ks_mod.atomic_write
    monkeypatch.setattr(ks_mod, "atomic_write",
                        lambda p, d, m=0o600: (_ for _ in ()).throw(OSError(5, "I/O")) if p.name == "agent.key"
                        else real(p, d, m))
    with pytest.raises(OSError):
        store.save_rotated(new)
    monkeypatch.setattr(ks_mod, "atomic_write", real)
    (tmp_path / "agent.pem.next").unlink()
    with pytest.raises(ConfigError, match="interrupted certificate rotation .* re-register with --force"):
        store.load()


def test_wipe_removes_staged_copies(tmp_path: Path, pair, monkeypatch) -> None:
    old, new = pair
    store = Keystore(tmp_path, "file")
    store.save(old)
    (tmp_path / "audit.log").write_text("kept\n")
    real = ks_mod.atomic_write
    monkeypatch.setattr(ks_mod, "atomic_write",
                        lambda p, d, m=0o600: (_ for _ in ()).throw(OSError(5, "I/O")) if p.name == "rotation.json"
                        else real(p, d, m))
    with pytest.raises(OSError):
        store.save_rotated(new)
    store.wipe()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
