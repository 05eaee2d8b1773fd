"""Run a throwaway PostgreSQL cluster on 127.0.0.1 for tests: ``initdb`` + ``postgres`` in one directory.

Used by ``tests/pg/conftest.py``; also runnable by hand (``python scripts/pgcluster.py DIR``
starts one and prints its URL until Ctrl-C). Layout of ``base_dir``::

    data/          the cluster (initdb, trust auth, superuser ``postgres``)
    sock/          its Unix socket (never /var/run/postgresql: no clash with a system cluster)
    postgres.log   stdout+stderr of initdb and the server

PostgreSQL refuses to run as root. As root, the binaries run as the ``postgres`` system user
(Debian's package creates it) and ``base_dir`` is handed to that user; otherwise they run as the
caller. The server is our direct child (``subprocess`` switches user itself, with no ``runuser``
wrapper in between) so shutdown signals reach the postmaster unchanged: SIGINT = fast shutdown,
SIGQUIT = immediate. It also gets SIGQUIT if the thread that started it dies, so a killed test run
leaves no server behind.

Settings favour speed and concurrency tests over durability: ``fsync=off``,
``synchronous_commit=off``, ``full_page_writes=off``, ``max_connections=200``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

HOST = "127.0.0.1"
SUPERUSER = "postgres"
SERVICE_USER = "postgres"
READY_LINE = "database system is ready to accept connections"
#: Unix socket paths are limited to 107 bytes (sun_path); ".s.PGSQL.65535" is 14 of them.
_MAX_SOCKET_DIR = 107 - 15
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgClusterError(RuntimeError):
    """The cluster could not be set up, started or used; the message carries the server log's tail."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when no server is installed.

    ``pg_config --bindir`` first (it names the server a developer chose); then Debian's
    ``/usr/lib/postgresql/<major>/bin``, newest major first. Debian's ``/usr/bin/pg_config`` may
    come from libpq-dev alone and point at a directory without a server, hence the check.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True))
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return bindir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child after the user switch (the kernel clears the setting on a credential
    # change, so it must come after). Without it, a test run killed by SIGKILL leaves a postmaster
    # holding a port and a directory on a shared CI machine.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGQUIT)  # 1 = PR_SET_PDEATHSIG; SIGQUIT = immediate shutdown
    except (OSError, AttributeError):
        pass


class PgCluster:
    """One throwaway cluster; a context manager (``with PgCluster(dir) as pg: url = pg.create_database("x")``)."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        bindir: str | os.PathLike[str] | None = None,
        start_timeout: float = 120.0,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        found = Path(bindir) if bindir is not None else find_bindir()
        if found is None:
            raise PgClusterError(
                "no PostgreSQL server found (pg_config --bindir, /usr/lib/postgresql/*/bin): "
                "run scripts/install-test-deps.sh"
            )
        self.bindir = found
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self.start_timeout = start_timeout
        self.extra_settings = dict(extra_settings or {})
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._saw_ready_line = False
        self._reader: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self._as_user: dict[str, Any] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "PgCluster":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> "PgCluster":
        """``initdb`` (first time only), then start the server and wait until it accepts connections."""
        if self._proc is not None:
            raise PgClusterError("cluster already started")
        self._prepare_dirs()
        self._log = open(self.log_path, "ab")
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            # A port picked free can be taken before the server binds it (other test runs share
            # the machine): try a few times with a new one.
            for attempt in range(3):
                self.port = free_port()
                if self._start_server():
                    break
                if attempt == 2 or "could not bind" not in self.log_tail(20):
                    raise PgClusterError(f"postgres did not start:\n{self.log_tail()}")
            self._check_connect()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT); immediate (SIGQUIT) if that hangs; SIGKILL last. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._reader is not None:
            self._reader.join(10.0)
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- use ----------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of a database in this cluster."""
        if self.port is None:
            raise PgClusterError("cluster not started")
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def async_url(self, dbname: str = "postgres") -> str:
        """The async twin of :meth:`url`, for Airflow's ``[database] sql_alchemy_conn_async``.

        Airflow otherwise derives ``postgresql+asyncpg://`` from the sync URL and fails to start
        without asyncpg installed; psycopg 3 serves both.
        """
        return self.url(dbname).replace("+psycopg://", "+psycopg_async://", 1)

    def connect(self, dbname: str = "postgres", **kwargs: Any):  # -> psycopg.Connection
        import psycopg

        if self.port is None:
            raise PgClusterError("cluster not started")
        return psycopg.connect(
            host=HOST, port=self.port, user=SUPERUSER, dbname=dbname, connect_timeout=30, **kwargs
        )

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        from psycopg import sql

        if not _DB_NAME.match(name):
            raise PgClusterError(f"database name {name!r} must match {_DB_NAME.pattern}")
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ----------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        if len(str(self.socket_dir)) > _MAX_SOCKET_DIR:
            raise PgClusterError(f"{self.socket_dir} is too long for a Unix socket path: use a shorter base_dir")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() != 0:
            self._as_user = {}
            return
        try:
            user = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise PgClusterError(
                f"postgres refuses to run as root and there is no '{SERVICE_USER}' user "
                "(Debian's postgresql package creates it)"
            ) from None
        self._as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        for path in (self.base_dir, self.socket_dir):
            os.chown(path, user.pw_uid, user.pw_gid)
        if self.data_dir.exists():
            for root, dirs, files in os.walk(self.data_dir):
                for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                    os.lchown(name, user.pw_uid, user.pw_gid)
        blocked = _first_blocked_parent(self.base_dir, user.pw_uid, user.pw_gid)
        if blocked is not None:
            raise PgClusterError(
                f"the '{SERVICE_USER}' user cannot traverse {blocked} to reach {self.base_dir}: "
                "put the cluster under a world-traversable directory (e.g. tempfile.mkdtemp())"
            )

    def _env(self) -> dict[str, str]:
        # The server's messages are parsed (READY_LINE, "could not bind"): keep them in English.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_", "LANG"))}
        env.update(LANG="C", LC_ALL="C")
        return env

    def _initdb(self) -> None:
        assert self._log is not None
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "--auth=trust",  # loopback-only throwaway cluster
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = subprocess.run(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env(), cwd=self.base_dir,
            timeout=self.start_timeout, **self._as_user,
        )
        if proc.returncode != 0:
            self._log.flush()
            raise PgClusterError(f"initdb failed (exit {proc.returncode}):\n{self.log_tail()}")

    def _server_cmd(self) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "lc_messages": "C",
            "logging_collector": "off",
            **self.extra_settings,
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _start_server(self) -> bool:
        """Start the postmaster; True once it logged that it accepts connections, False if it exited."""
        self._ready.clear()
        self._saw_ready_line = False
        proc = subprocess.Popen(
            self._server_cmd(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self._env(), cwd=self.base_dir, preexec_fn=_die_with_parent, **self._as_user,
        )
        self._proc = proc
        self._reader = threading.Thread(target=self._pump, args=(proc,), name="pgcluster-log", daemon=True)
        self._reader.start()
        # The reader sets the event on the ready line and also when the server exits (EOF),
        # so this wait ends on whichever happens first.
        if not self._ready.wait(self.start_timeout):
            raise PgClusterError(f"postgres not ready after {self.start_timeout:.0f}s:\n{self.log_tail()}")
        # Decided by what the server said, not by poll(): at EOF the exiting server may not be
        # reapable yet, and a bind failure would pass for a running server.
        if self._saw_ready_line:
            return True
        proc.wait(self.start_timeout)
        self._reader.join(10.0)
        self._proc = self._reader = None
        return False

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        # Drains the server's output into the log for its whole life (a full pipe would block
        # the server) and turns the ready line into an event.
        assert proc.stdout is not None
        log = self._log
        for line in iter(proc.stdout.readline, b""):
            try:
                if log is not None:
                    log.write(line)
                    log.flush()
            except ValueError:  # closed by stop() after an orphaned backend kept the pipe open
                pass
            if READY_LINE.encode() in line:
                self._saw_ready_line = True
                self._ready.set()
        proc.stdout.close()
        self._ready.set()

    def _check_connect(self) -> None:
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # psycopg.Error, or ImportError when psycopg is missing
            raise PgClusterError(f"server started but refuses connections: {exc}\n{self.log_tail()}") from exc


def _first_blocked_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that ``uid`` cannot search (x bit), if any."""
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: pgcluster.py BASE_DIR   (starts a cluster, prints its URL, stops on Ctrl-C)", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with PgCluster(argv[0]) as pg:
        print(pg.url(), flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
