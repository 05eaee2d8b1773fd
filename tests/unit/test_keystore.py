"""Keystore: backend choice (auto/keyring/file), file modes, atomic writes, refusal of loose key files."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import keyring
import keyring.errors
import pytest
import trustme
from keyring.backend import KeyringBackend
from keyring.backends import fail

from edge_agent.errors import ConfigError, InsecureKeyFile, StateMissing
from edge_agent.identity import keystore as ks_mod
from edge_agent.identity.keystore import Keystore, StoredIdentity, backend_recommended, keyring_usable


class MemoryKeyring(KeyringBackend):
    """A recommended backend that keeps secrets in a dict (stands in for Secret Service / Keychain)."""

    priority = 5  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


PlaintextLike = type("PlaintextKeyring", (MemoryKeyring,), {"__module__": "keyrings.alt.file", "priority": 5})


class LowPriority(MemoryKeyring):
    priority = 0.5  # type: ignore[assignment]


@pytest.fixture()
def use_keyring() -> Iterator:
    previous = keyring.get_keyring()

    def install(backend: KeyringBackend) -> KeyringBackend:
        keyring.set_keyring(backend)
        return backend

    yield install
    keyring.set_keyring(previous)


@pytest.fixture(scope="module")
def identity() -> StoredIdentity:
    ca = trustme.CA()
    leaf = ca.issue_cert("agent.test")
    return StoredIdentity(
        agent_id="ag_1", name="edge-1", queues=("q1", "q2"), region="eu-west", url="https://gw.test:8443",
        executor="executor_plugin.executor.EdgeAgentExecutor",
        cert_not_after=datetime(2031, 1, 1, tzinfo=timezone.utc),
        cert_pem=leaf.cert_chain_pems[0].bytes().decode(), ca_pems=(ca.cert_pem.bytes().decode(),),
        key_pem=leaf.private_key_pem.bytes(),
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_backend_layout_and_modes(tmp_path: Path, identity: StoredIdentity) -> None:
    sd = tmp_path / "state"
    store = Keystore(sd, "file")
    assert store.save(identity) == "file"
    assert mode(sd) == 0o700
    assert mode(sd / "agent.key") == 0o600
    assert (sd / "agent.key").read_bytes() == identity.key_pem
    meta = json.loads((sd / "identity.json").read_text())
    assert meta["agent_id"] == "ag_1" and meta["queues"] == ["q1", "q2"] and meta["key_storage"] == "file"
    assert "PRIVATE KEY" not in (sd / "identity.json").read_text()  # no secrets in identity.json
    assert not [p for p in sd.iterdir() if p.name.endswith(".tmp")]
    assert store.load() == identity


def test_existing_wide_state_dir_is_tightened(tmp_path: Path, identity: StoredIdentity) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o755)
    os.chmod(sd, 0o755)
    Keystore(sd, "file").save(identity)
    assert mode(sd) == 0o700


def test_load_without_identity_is_state_missing(tmp_path: Path) -> None:
    with pytest.raises(StateMissing, match="run 'edge-agent register"):
        Keystore(tmp_path, "file").load()


def test_key_readable_by_others_is_refused(tmp_path: Path, identity: StoredIdentity) -> None:
    store = Keystore(tmp_path, "file")
    store.save(identity)
    os.chmod(tmp_path / "agent.key", 0o640)
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        store.load()


def test_key_that_does_not_match_the_certificate_is_reported(tmp_path: Path, identity: StoredIdentity) -> None:
    other = trustme.CA().issue_cert("other.test").private_key_pem.bytes()
    store = Keystore(tmp_path, "file")
    store.save(identity)
    ks_mod.atomic_write(tmp_path / "agent.key", other, 0o600)
    with pytest.raises(ConfigError, match="do not belong together"):
        store.load()


def test_damaged_identity_json(tmp_path: Path, identity: StoredIdentity) -> None:
    store = Keystore(tmp_path, "file")
    store.save(identity)
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        store.load()


def test_failed_replace_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "agent.key"
    ks_mod.atomic_write(target, b"old", 0o600)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ks_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        ks_mod.atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["agent.key"]


def test_atomic_write_fsyncs_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ks_mod.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ks_mod.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    ks_mod.atomic_write(tmp_path / "f", b"data", 0o600)
    assert calls[:2] == ["fsync", "replace"]  # data on disk before the name points at it
    assert calls[2:] == ["fsync"]  # and the directory entry too


def test_auto_uses_files_when_no_keyring_is_available(tmp_path: Path, identity: StoredIdentity, use_keyring) -> None:
    use_keyring(fail.Keyring())
    assert keyring_usable()[0] is False
    assert Keystore(tmp_path, "auto").save(identity) == "file"
    assert (tmp_path / "agent.key").exists()


def test_explicit_keyring_without_one_is_a_config_error(tmp_path: Path, identity: StoredIdentity, use_keyring) -> None:
    use_keyring(fail.Keyring())
    with pytest.raises(ConfigError, match="no OS keyring"):
        Keystore(tmp_path, "keyring").save(identity)
    assert not (tmp_path / "identity.json").exists()


def test_auto_uses_a_recommended_keyring(tmp_path: Path, identity: StoredIdentity, use_keyring) -> None:
    backend = use_keyring(MemoryKeyring())
    store = Keystore(tmp_path, "auto")
    assert store.save(identity) == "keyring"
    assert not (tmp_path / "agent.key").exists()
    assert list(backend.secrets.values()) == [identity.key_pem.decode()]
    assert json.loads((tmp_path / "identity.json").read_text())["key_storage"] == "keyring"
    assert store.load() == identity
    store.wipe()
    assert backend.secrets == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(StateMissing):
        store.load()


@pytest.mark.parametrize("backend", [PlaintextLike(), LowPriority()])
def test_auto_rejects_plaintext_and_low_priority_keyrings(
    tmp_path: Path, identity: StoredIdentity, use_keyring, backend: KeyringBackend
) -> None:
    use_keyring(backend)
    assert backend_recommended(backend)[0] is False
    assert Keystore(tmp_path, "auto").save(identity) == "file"
    assert backend.secrets == {}  # type: ignore[attr-defined]


def test_chainer_is_judged_by_its_members() -> None:
    from keyring.backends.chainer import ChainerBackend

    class Chain(ChainerBackend):
        def __init__(self, members: list) -> None:
            self._members = members

        @property
        def backends(self) -> list:  # type: ignore[override]
            return self._members

    assert backend_recommended(Chain([]))[0] is False
    assert backend_recommended(Chain([MemoryKeyring()]))[0] is True
    assert backend_recommended(Chain([MemoryKeyring(), PlaintextLike()]))[0] is False


def test_switching_from_keyring_to_file_removes_the_keyring_entry(
    tmp_path: Path, identity: StoredIdentity, use_keyring
) -> None:
    backend = use_keyring(MemoryKeyring())
    Keystore(tmp_path, "keyring").save(identity)
    Keystore(tmp_path, "file").save(identity)
    assert backend.secrets == {}
    assert Keystore(tmp_path).load() == identity


def test_wipe_file_backend(tmp_path: Path, identity: StoredIdentity) -> None:
    store = Keystore(tmp_path, "file")
    store.save(identity)
    store.wipe()
    assert list(tmp_path.iterdir()) == []
    store.wipe()  # idempotent
