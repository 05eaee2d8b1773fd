"""Where the agent's identity lives: the only module that touches ``keyring``.

Layout in the state directory (mode 0700)::

    identity.json   agent id, name, queues, region, gateway url, executor, cert expiry, key storage (no secrets)
    ca.pem          the CA bundle this agent trusts for the gateway
    agent.pem       this agent's client certificate
    agent.key       its private key (0600), unless the key is kept in the OS keyring
    rotation.json   only during a certificate rotation: the new identity, with agent.key.next and
                    agent.pem.next (or the keyring entry '<user>#next') holding the new key and certificate

Backends: ``file`` always uses ``agent.key``; ``keyring`` requires a usable OS keyring; ``auto`` uses
the keyring only when the active backend is a recommended one. On a headless Linux host keyring falls
back to a backend that refuses every call, and with ``keyrings.alt`` installed it silently stores
secrets base64-encoded in a plain file: ``auto`` rejects both and uses the 0600 file instead.

Every file is written to a temporary name, fsynced and renamed over the old one, so a crash or a full
disk leaves either the old file or the new one, never a torn key. ``identity.json`` is written last:
it is the commit point of a registration.

A rotation replaces two files that must match (key and certificate), which no single rename can do.
:meth:`Keystore.save_rotated` therefore stages both next to the current ones, then writes
``rotation.json`` (the commit point), then copies the staged pair over the current one. A crash
before the commit point leaves the old pair; after it, the next :meth:`Keystore.load` finishes the
copy. Without this, a crash between the two writes would leave a key and a certificate that do not
belong together, and the agent could only be re-registered with a new token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import ConfigError, InsecureKeyFile, StateMissing
from edge_agent.fsutil import atomic_write, fsync_dir

KEYRING_SERVICE = "edge-agent"
IDENTITY_FILE = "identity.json"
CA_FILE = "ca.pem"
CERT_FILE = "agent.pem"
KEY_FILE = "agent.key"
PENDING_FILE = "rotation.json"
NEXT_KEY_FILE = "agent.key.next"
NEXT_CERT_FILE = "agent.pem.next"
LOCK_FILE = "keystore.lock"
FORMAT_VERSION = 1

KeyStorage = Literal["keyring", "file"]


@dataclass(frozen=True)
class StoredIdentity:
    """Everything the agent needs to talk to its gateway as itself."""

    agent_id: str
    name: str
    queues: tuple[str, ...]
    region: str
    #: Base URL of the gateway, ``https://host[:port][/prefix]``.
    url: str
    #: The hosted side's ``[core] executor`` string; the runtime must use the same one.
    executor: str
    cert_not_after: datetime
    cert_pem: str
    ca_pems: tuple[str, ...]
    key_pem: bytes = field(repr=False)

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) >= self.cert_not_after

    def public_summary(self) -> dict[str, Any]:
        """What may be shown to an operator (no key, no certificate bodies)."""
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "queues": list(self.queues),
            "region": self.region,
            "url": self.url,
            "executor": self.executor,
            "cert_not_after": self.cert_not_after.isoformat(),
        }


class Keystore:
    """Loads, saves and wipes the identity kept in ``state_dir`` (key in a file or in the OS keyring)."""

    def __init__(self, state_dir: Path, backend: str = "auto") -> None:
        if backend not in ("auto", "keyring", "file"):
            raise ConfigError(f"unknown secret backend {backend!r}")
        self.state_dir = Path(state_dir)
        self.backend = backend

    # -- paths ----------------------------------------------------------------------------------

    @property
    def identity_path(self) -> Path:
        return self.state_dir / IDENTITY_FILE

    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def _keyring_user(self) -> str:
        # One keyring entry per state directory, so two agents on one host do not overwrite each other.
        return f"private-key:{self.state_dir.absolute()}"

    def exists(self) -> bool:
        return self.identity_path.is_file()

    # -- backend choice -------------------------------------------------------------------------

    def storage_for_save(self) -> KeyStorage:
        """Resolve ``auto``/``keyring``/``file`` to where a new key will be stored."""
        if self.backend == "file":
            return "file"
        usable, why = keyring_usable()
        if usable:
            return "keyring"
        if self.backend == "keyring":
            raise ConfigError(f"secret backend 'keyring' requested but {why}; use --secret-backend file")
        return "file"

    # -- load -----------------------------------------------------------------------------------

    def load(self) -> StoredIdentity:
        """Read the identity; raise :class:`StateMissing` if there is none, ConfigError if it is damaged."""
        if (self.state_dir / PENDING_FILE).exists():
            with self._locked():
                if (self.state_dir / PENDING_FILE).exists():  # another process may have just finished it
                    self._finish_rotation()
        try:
            raw = self.identity_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StateMissing(self.state_dir) from None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.identity_path}: {exc.strerror or exc}") from None
        try:
            meta = json.loads(raw)
            storage: KeyStorage = meta["key_storage"]
            cert_pem = self._read_text(CERT_FILE)
            ca_pem = self._read_text(CA_FILE)
            key_pem = self._read_key(storage, self.key_path, self._keyring_user)
            identity = StoredIdentity(
                agent_id=str(meta["agent_id"]),
                name=str(meta["name"]),
                queues=tuple(meta["queues"]),
                region=str(meta["region"]),
                url=str(meta["url"]),
                executor=str(meta["executor"]),
                cert_not_after=datetime.fromisoformat(meta["cert_not_after"]),
                cert_pem=cert_pem,
                ca_pems=tuple(_split_pems(ca_pem)),
                key_pem=key_pem,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"identity in {self.state_dir} is damaged ({exc!r}): re-register with --force") from None
        _check_key_matches_cert(identity, self.state_dir)
        return identity

    def _read_text(self, name: str) -> str:
        path = self.state_dir / name
        try:
            return path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing: re-register with --force") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _read_key(self, storage: KeyStorage, path: Path, keyring_user: str) -> bytes:
        if storage == "keyring":
            import keyring
            import keyring.errors

            try:
                value = keyring.get_password(KEYRING_SERVICE, keyring_user)
            except keyring.errors.KeyringError as exc:
                raise ConfigError(f"the private key is kept in the OS keyring, which failed: {exc}") from None
            if value is None:
                raise ConfigError(f"the private key for {self.state_dir} is missing from the OS keyring: re-register")
            return value.encode("ascii")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing: re-register with --force") from None
        except OSError as exc:
            raise ConfigError(f"cannot open {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            # Checked on the open descriptor: a check on the path could race a chmod/replace.
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            if mode & 0o077:
                raise InsecureKeyFile(path, mode)
            return fh.read()

    # -- save -----------------------------------------------------------------------------------

    def save(self, identity: StoredIdentity) -> KeyStorage:
        """Store the identity; returns where the key went. identity.json is written last (commit point)."""
        storage = self.prepare()
        with self._locked():
            # A rotation of the identity being replaced must not be finished over the new one later.
            self._discard_rotation()
        previous = self._stored_key_storage()
        if storage == "keyring":
            import keyring
            import keyring.errors

            try:
                keyring.set_password(KEYRING_SERVICE, self._keyring_user, identity.key_pem.decode("ascii"))
            except keyring.errors.KeyringError as exc:
                raise ConfigError(f"could not store the private key in the OS keyring: {exc}") from None
            # A key file from an earlier file-backed registration must not linger next to a keyring key.
            _unlink(self.key_path)
        else:
            atomic_write(self.key_path, identity.key_pem, 0o600)
            if previous == "keyring":
                self._delete_keyring_entry()
        atomic_write(self.state_dir / CERT_FILE, identity.cert_pem.encode("ascii"), 0o644)
        atomic_write(self.state_dir / CA_FILE, "".join(_ensure_nl(p) for p in identity.ca_pems).encode("ascii"), 0o644)
        meta = {"format": FORMAT_VERSION, **identity.public_summary(), "key_storage": storage}
        atomic_write(self.identity_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"), 0o644)
        return storage

    def save_rotated(self, identity: StoredIdentity) -> None:
        """Replace key, certificate and CA bundle of the stored identity (rotation); crash-safe, see the module doc.

        The key stays where the registration put it (file or keyring).
        """
        with self._locked():
            storage = self._stored_key_storage()
            if storage not in ("file", "keyring"):
                raise StateMissing(self.state_dir)
            self._discard_rotation()
            self._write_key(storage, identity.key_pem, self.state_dir / NEXT_KEY_FILE, self._keyring_next)
            atomic_write(self.state_dir / NEXT_CERT_FILE, identity.cert_pem.encode("ascii"), 0o644)
            meta = {"format": FORMAT_VERSION, **identity.public_summary(), "key_storage": storage,
                    "ca_pems": list(identity.ca_pems)}
            atomic_write(self.state_dir / PENDING_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"), 0o644)
            self._finish_rotation()

    def _finish_rotation(self) -> None:
        """Copy the staged pair over the current one (idempotent); call with the keystore lock held."""
        pending = self.state_dir / PENDING_FILE
        try:
            meta = json.loads(pending.read_text(encoding="utf-8"))
            storage: KeyStorage = meta.pop("key_storage")
            ca_pems = [str(p) for p in meta.pop("ca_pems")]
            key_pem = self._read_key(storage, self.state_dir / NEXT_KEY_FILE, self._keyring_next)
            cert_pem = self._read_text(NEXT_CERT_FILE)
        except (OSError, KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(
                f"an interrupted certificate rotation in {self.state_dir} cannot be completed ({exc}): "
                "re-register with --force"
            ) from None
        self._write_key(storage, key_pem, self.key_path, self._keyring_user)
        atomic_write(self.state_dir / CERT_FILE, cert_pem.encode("ascii"), 0o644)
        atomic_write(self.state_dir / CA_FILE, "".join(_ensure_nl(p) for p in ca_pems).encode("ascii"), 0o644)
        meta["key_storage"] = storage
        atomic_write(self.identity_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"), 0o644)
        _unlink(pending)
        fsync_dir(self.state_dir)
        self._discard_rotation()

    def _discard_rotation(self) -> None:
        """Remove a rotation record and staged copies (none of them is current)."""
        _unlink(self.state_dir / PENDING_FILE)
        for name in (NEXT_KEY_FILE, NEXT_CERT_FILE):
            _unlink(self.state_dir / name)
        if self._stored_key_storage() == "keyring":
            self._delete_keyring_entry(self._keyring_next)

    def _write_key(self, storage: str, key_pem: bytes, path: Path, keyring_user: str) -> None:
        if storage == "keyring":
            import keyring
            import keyring.errors

            try:
                keyring.set_password(KEYRING_SERVICE, keyring_user, key_pem.decode("ascii"))
            except keyring.errors.KeyringError as exc:
                raise ConfigError(f"could not store the private key in the OS keyring: {exc}") from None
        else:
            atomic_write(path, key_pem, 0o600)

    @property
    def _keyring_next(self) -> str:
        return f"{self._keyring_user}#next"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise rotation, its completion in load() and registration across processes."""
        self._ensure_dir()
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def prepare(self) -> KeyStorage:
        """Check, before anything irreversible (a token is single-use), that a key can be stored here."""
        storage = self.storage_for_save()
        self._ensure_dir()
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"state directory {self.state_dir} is not writable by this user")
        return storage

    def _stored_key_storage(self) -> str | None:
        try:
            value = json.loads(self.identity_path.read_text(encoding="utf-8")).get("key_storage")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def _delete_keyring_entry(self, user: str | None = None) -> None:
        import keyring
        import keyring.errors

        try:
            keyring.delete_password(KEYRING_SERVICE, user or self._keyring_user)
        except keyring.errors.KeyringError:
            pass  # already gone, or the keyring is unavailable now: nothing else we can do

    def _ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if stat.S_IMODE(self.state_dir.stat().st_mode) & 0o077:
                os.chmod(self.state_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot prepare state directory {self.state_dir}: {exc.strerror or exc}") from None

    # -- wipe -----------------------------------------------------------------------------------

    def wipe(self) -> None:
        """Forget the identity. identity.json goes first, so an interrupted wipe reads as 'no identity'."""
        storage = self._stored_key_storage()
        _unlink(self.identity_path)
        _unlink(self.state_dir / PENDING_FILE)
        if storage == "keyring":
            self._delete_keyring_entry()
            self._delete_keyring_entry(self._keyring_next)
        for name in (KEY_FILE, CERT_FILE, CA_FILE, NEXT_KEY_FILE, NEXT_CERT_FILE, LOCK_FILE):
            _unlink(self.state_dir / name)
        fsync_dir(self.state_dir)


# -- keyring policy -----------------------------------------------------------------------------


def keyring_usable() -> tuple[bool, str]:
    """Is the active keyring backend one we trust with a private key? Returns (usable, reason if not)."""
    try:
        import keyring
    except ImportError:  # pragma: no cover - keyring is a dependency
        return False, "the keyring package is not installed"
    try:
        backend = keyring.get_keyring()
    except Exception as exc:  # keyring's backend discovery can fail in many third-party ways
        return False, f"the keyring backend could not be loaded ({exc})"
    return backend_recommended(backend)


def backend_recommended(backend: object) -> tuple[bool, str]:
    from keyring.backends import chainer, fail

    name = f"{type(backend).__module__}.{type(backend).__name__}"
    if type(backend).__module__.startswith("keyrings.alt"):
        return False, f"the active keyring {name} stores secrets in plain files"
    if isinstance(backend, fail.Keyring):
        return False, "no OS keyring is available (headless host, no D-Bus session)"
    if isinstance(backend, chainer.ChainerBackend):
        members = list(backend.backends)
        if not members:
            return False, "the keyring chainer has no backends"
        for member in members:
            ok, why = backend_recommended(member)
            if not ok:
                return False, why
        return True, ""
    try:
        priority = float(backend.priority)  # type: ignore[attr-defined]
    except Exception as exc:
        return False, f"the keyring {name} is not usable ({exc})"
    if priority < 1:
        return False, f"the active keyring {name} is not a recommended backend (priority {priority})"
    return True, ""


# -- files --------------------------------------------------------------------------------------


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _ensure_nl(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


def _split_pems(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    out = []
    for part in text.split(end):
        part = part.strip()
        if part:
            out.append(f"{part}\n{end}\n")
    if not out:
        raise ValueError("no certificate in CA bundle")
    return out


def _check_key_matches_cert(identity: StoredIdentity, state_dir: Path) -> None:
    # A registration interrupted between writing the key and the certificate leaves a pair that TLS
    # would reject with an obscure handshake error; say what happened instead. Checked with ssl, not
    # cryptography: this runs at every start of the control process (see identity/tlskeys.py).
    from edge_agent.identity.tlskeys import KeyMismatch, check_pair

    try:
        check_pair(identity.cert_pem, identity.key_pem)
    except KeyMismatch:
        raise ConfigError(
            f"private key and certificate in {state_dir} do not belong together "
            "(interrupted registration?): re-register with --force"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"identity in {state_dir} is damaged ({exc}): re-register with --force") from None


__all__ = ["Keystore", "StoredIdentity", "atomic_write", "backend_recommended", "keyring_usable"]
