"""Running the agent as a service: the hardened systemd unit, its installation, first-start registration
and the local health verdict used by container health checks.

* :func:`render_unit` returns the text of ``edge-agent.service``: ``Type=notify`` (the agent sends
  READY, WATCHDOG and STOPPING through :mod:`edge_agent.sdnotify`), a restart policy, a private
  ``StateDirectory=`` for the identity and task logs, and the sandboxing that still lets tasks reach
  the network and write their logs.
* :func:`install` writes the unit, the environment file and (optionally) the one-time registration
  token below a root directory (``/`` on a real host, a temporary directory in tests). It never calls
  ``systemctl``: the installer script does that, on a real host only.
* :func:`first_start_token` tells ``edge-agent run`` whether to register before it starts: when the
  state dir has no identity yet and a token is available from ``--token-file`` or from the systemd
  credential ``$CREDENTIALS_DIRECTORY/registration-token`` (``LoadCredential=``; a Kubernetes Secret
  mounted there works the same way). This is kubelet's bootstrap model: install = token + enable.
* :func:`health` is the verdict of ``edge-agent health``: the local process is alive and its loops
  make progress. It does not ask the gateway: a gateway outage must not make an orchestrator restart
  every agent (and kill their running tasks); the agent retries by itself.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.fsutil import atomic_write

UNIT_NAME = "edge-agent.service"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/edge-agent")
ENV_FILE_NAME = "edge-agent.env"
TOKEN_FILE_NAME = "registration-token"
#: The credential name ``edge-agent run`` looks for in ``$CREDENTIALS_DIRECTORY``.
TOKEN_CREDENTIAL = "registration-token"
ENV_URL = "EDGE_AGENT_URL"
ENV_TOKEN_FILE = "EDGE_AGENT_TOKEN_FILE"

#: Address families the agent and its tasks need. AF_NETLINK: glibc's getaddrinfo() with
#: AI_ADDRCONFIG asks the kernel for the host's addresses over netlink; without it name lookups of
#: some task libraries degrade in odd ways.
ADDRESS_FAMILIES = "AF_INET AF_INET6 AF_UNIX AF_NETLINK"


def render_unit(
    binary: str | Path,
    user: str | None = None,
    *,
    group: str | None = None,
    runtime_python: str | Path | None = None,
    dags_folder: str | Path | None = None,
    concurrency: int | None = None,
    env_file: str | Path | None = "/" + str(CONFIG_DIR / ENV_FILE_NAME),
    token_credential: str | Path | None = None,
    encrypted_credential: bool = False,
    read_write_paths: Sequence[str | Path] = (),
    watchdog_seconds: int = 60,
    drain_seconds: int = 600,
    memory_deny_write_execute: bool = False,
) -> str:
    """The text of ``edge-agent.service``.

    ``user`` None uses ``DynamicUser=yes`` (systemd allocates a user per start; the state dir keeps
    its files); a name runs as that existing user (the installer creates ``edge-agent``), which task
    code that reads shared files usually needs. ``runtime_python`` is required for the standalone
    binary (a frozen agent has no Python of its own to run tasks with). ``token_credential`` adds
    ``LoadCredential=`` (``LoadCredentialEncrypted=`` with ``encrypted_credential``) for first-start
    registration. ``drain_seconds`` is how long a stop may wait for running tasks before systemd
    kills them. ``memory_deny_write_execute`` is off by default: it breaks task libraries that JIT
    (numba, cffi callbacks, PyPy), and the agent cannot know what its tasks import.
    """
    binary = Path(binary)
    if not binary.is_absolute():
        raise ConfigError(f"the unit needs an absolute path to edge-agent, got {binary}")
    if watchdog_seconds < 10:
        raise ConfigError("watchdog_seconds below 10 s would restart an agent on an ordinary pause")
    argv = [str(binary), "run"]
    if runtime_python:
        argv += ["--runtime-python", str(runtime_python)]
    if dags_folder:
        argv += ["--dags-folder", str(dags_folder)]
    if concurrency:
        argv += ["--concurrency", str(int(concurrency))]

    lines: list[str] = [
        "# edge-agent: runs Apache Airflow tasks for a hosted Airflow, outbound-only over mutual TLS.",
        "# Rendered by edge_agent.service.render_unit; local changes belong in a drop-in",
        "# ('systemctl edit edge-agent'), which survives reinstalls.",
        "[Unit]",
        "Description=edge-agent (Apache Airflow remote execution agent)",
        "Documentation=file:///usr/share/doc/edge-agent/install.md",
        "Wants=network-online.target",
        "After=network-online.target",
        # At most 10 starts in 10 minutes: a broken configuration stops looping and shows as failed.
        "StartLimitIntervalSec=10min",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        # Only the control process may send READY/WATCHDOG: a task must not be able to fake health.
        "NotifyAccess=main",
        "ExecStart=" + " ".join(_quote(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=5s",
        # Exit code 2 = bad configuration (edge_agent.errors.ConfigError): restarting will not fix it.
        "RestartPreventExitStatus=2",
        # READY=1 comes after the identity is loaded and the task runtime imported the Task SDK
        # (tens of seconds on a slow disk), not after the gateway answered.
        "TimeoutStartSec=180s",
        f"WatchdogSec={int(watchdog_seconds)}s",
        # Stop = SIGTERM to the control process only; it drains (running tasks finish and are
        # reported). Whatever is left after the drain time is killed, tasks included.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(drain_seconds)}s",
    ]
    if user:
        lines += [f"User={user}", f"Group={group or user}"]
    else:
        lines.append("DynamicUser=yes")
    if env_file:
        # '-': the file is optional. It holds HTTPS_PROXY, EDGE_AGENT_URL and the like; root reads it
        # before dropping privileges, so it can stay 0600 root (proxy passwords).
        lines.append(f"EnvironmentFile=-{env_file}")
    lines += [
        "Environment=EDGE_AGENT_SECRET_BACKEND=file",
        "Environment=PYTHONUNBUFFERED=1",
        # Identity, task logs, the runtime's AIRFLOW_HOME: /var/lib/edge-agent ($STATE_DIRECTORY).
        "StateDirectory=edge-agent",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=edge-agent",
        "RuntimeDirectoryMode=0700",
        "CacheDirectory=edge-agent",
        "ConfigurationDirectory=edge-agent",
        "UMask=0077",
        "WorkingDirectory=%S/edge-agent",
    ]
    if token_credential:
        kind = "LoadCredentialEncrypted" if encrypted_credential else "LoadCredential"
        lines.append(f"{kind}={TOKEN_CREDENTIAL}:{token_credential}")
    lines += [
        "# Sandbox. Tasks inherit it: they can reach the network and write below the state dir,",
        "# /tmp (private) and any ReadWritePaths= added here; the rest of the system is read-only.",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "ProcSubset=pid",
        f"RestrictAddressFamilies={ADDRESS_FAMILIES}",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "DevicePolicy=closed",
        "KeyringMode=private",
    ]
    if memory_deny_write_execute:
        lines.append("MemoryDenyWriteExecute=yes")
    for path in read_write_paths:
        lines.append(f"ReadWritePaths={_quote(str(path))}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    # systemd's ExecStart= splitting follows shell-like quoting; '%' starts a specifier and '$' a
    # variable expansion, both of which would rewrite a path that happens to contain them.
    return shlex.quote(arg.replace("%", "%%").replace("$", "$$"))


def render_env_file(
    *, url: str | None = None, https_proxy: str | None = None, no_proxy: str | None = None,
    runtime_python: str | None = None, dags_folder: str | None = None, extra: Mapping[str, str] | None = None,
) -> str:
    """The ``EnvironmentFile=``: one ``KEY=value`` a line, every setting commented when unset."""
    values = {
        ENV_URL: url,
        "HTTPS_PROXY": https_proxy,
        "NO_PROXY": no_proxy,
        "EDGE_AGENT_RUNTIME_PYTHON": runtime_python,
        "EDGE_AGENT_DAGS_FOLDER": dags_folder,
        **(extra or {}),
    }
    out = [
        "# edge-agent service environment (read by systemd as root; keep it 0600: proxy passwords).",
        "# Uncomment and set what applies, then 'systemctl restart edge-agent'.",
    ]
    for key, value in values.items():
        if value is None or value == "":
            out.append(f"#{key}=")
        else:
            if "\n" in value:
                raise ConfigError(f"{key} must be one line")
            out.append(f"{key}={_env_quote(value)}")
    return "\n".join(out) + "\n"


def _env_quote(value: str) -> str:
    return value if all(c.isalnum() or c in "/:._-@,=+%" for c in value) else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Installed:
    """What :func:`install` wrote (paths below ``root``)."""

    unit: Path
    env_file: Path
    token: Path | None
    env_file_kept: bool


def install(
    binary: str | Path,
    user: str | None = None,
    *,
    root: str | Path = "/",
    token_file: str | Path | None = None,
    token_text: str | None = None,
    url: str | None = None,
    https_proxy: str | None = None,
    no_proxy: str | None = None,
    runtime_python: str | None = None,
    dags_folder: str | None = None,
    concurrency: int | None = None,
    read_write_paths: Sequence[str | Path] = (),
    overwrite_env: bool = False,
) -> Installed:
    """Write the unit, the environment file and the registration token below ``root``. Idempotent.

    ``binary`` is the path on the target system (it need not exist below ``root`` yet). The token,
    from ``token_file`` or ``token_text``, goes to ``/etc/edge-agent/registration-token`` (0600,
    read by systemd as root and handed to the agent as a credential). An existing environment file
    is kept (the operator may have edited it) unless ``overwrite_env``. Nothing here starts or
    enables the service.
    """
    root = Path(root)
    if token_file is not None and token_text is not None:
        raise ConfigError("give either a token file or the token text, not both")
    if token_file is not None:
        try:
            token_text = Path(token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    token_text = token_text.strip() if token_text is not None else None
    if token_text == "":
        raise ConfigError("the registration token is empty")

    config_dir = root / CONFIG_DIR
    token_target = "/" + str(CONFIG_DIR / TOKEN_FILE_NAME)
    token_path: Path | None = None
    if token_text is not None:
        token_path = config_dir / TOKEN_FILE_NAME
        atomic_write(token_path, (token_text + "\n").encode("utf-8"), 0o600)
    has_token = token_path is not None or (config_dir / TOKEN_FILE_NAME).exists()

    unit_text = render_unit(
        binary, user, runtime_python=runtime_python, dags_folder=dags_folder, concurrency=concurrency,
        token_credential=token_target if has_token else None, read_write_paths=read_write_paths,
    )
    unit_path = root / UNIT_DIR / UNIT_NAME
    atomic_write(unit_path, unit_text.encode("utf-8"), 0o644)

    env_path = config_dir / ENV_FILE_NAME
    kept = env_path.exists() and not overwrite_env
    if not kept:
        env_text = render_env_file(url=url, https_proxy=https_proxy, no_proxy=no_proxy)
        atomic_write(env_path, env_text.encode("utf-8"), 0o600)
    os.chmod(config_dir, 0o755)
    return Installed(unit=unit_path, env_file=env_path, token=token_path, env_file_kept=kept)


@dataclass(frozen=True)
class FirstStart:
    """Register before running: the gateway URL and the token text, and where the token came from."""

    url: str
    token: str = ""
    source: str = ""

    def __repr__(self) -> str:  # the token must not reach a log line through a repr
        return f"FirstStart(url={self.url!r}, source={self.source!r})"


def first_start_token(
    *,
    has_identity: bool,
    url: str | None = None,
    token_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> FirstStart | None:
    """What ``edge-agent run`` should register with before it starts, or None to just run.

    None when the state dir already holds an identity (the token was used on an earlier start and is
    ignored from then on) or when no token is available (``run`` then fails with "no identity: run
    'edge-agent register'"). The token comes from ``token_file`` (``--token-file``), else
    ``$EDGE_AGENT_TOKEN_FILE``, else ``$CREDENTIALS_DIRECTORY/registration-token``; the URL from
    ``url`` (``--url``), else ``$EDGE_AGENT_URL``.
    """
    if has_identity:
        return None
    env = os.environ if env is None else env
    path: Path | None = None
    if token_file:
        path, source = Path(token_file).expanduser(), "--token-file"
    elif env.get(ENV_TOKEN_FILE):
        path, source = Path(env[ENV_TOKEN_FILE]).expanduser(), f"${ENV_TOKEN_FILE}"
    elif env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / TOKEN_CREDENTIAL
        if candidate.is_file():
            path, source = candidate, f"credential {TOKEN_CREDENTIAL}"
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the registration token {path} ({source}): {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"the registration token {path} ({source}) is empty")
    gateway = url or env.get(ENV_URL)
    if not gateway:
        raise ConfigError(
            f"no identity yet and a registration token in {path}, but no gateway URL: set ${ENV_URL} "
            "(in /etc/edge-agent/edge-agent.env for the service) or pass --url"
        )
    return FirstStart(url=gateway, token=text, source=source)


# -- health --------------------------------------------------------------------------------------

#: Phases of a serving agent (``Agent.publish``); "failed"/"stopped" are unhealthy.
HEALTHY_STATES = frozenset({"running", "draining", "cancelling"})


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str


def health(
    status: Mapping[str, Any] | None,
    *,
    now: datetime | None = None,
    heartbeat_max_age: float = 90.0,
    start_grace: float = 300.0,
) -> Health:
    """Is the local agent process alive and making progress? ``status`` is ``read_status(<state>/status.json)``.

    Healthy: the process named in the status file is alive, its state is a serving one, and its
    heartbeat loop attempted a heartbeat (successful or not) within ``heartbeat_max_age`` seconds.
    A failed heartbeat still counts as progress: the gateway being down is not this process's
    fault, and restarting it would only kill its running tasks. While starting (the Task SDK import
    takes a while), up to ``start_grace`` seconds pass as healthy.
    """
    now = now or datetime.now(timezone.utc)
    if status is None:
        return Health(False, "no status file: 'edge-agent run' has not started with this state dir")
    if not status.get("alive"):
        return Health(False, f"the agent process (pid {status.get('pid')}) is not running")
    state = status.get("state")
    hb = status.get("last_heartbeat") or {}
    if state == "starting" or (state in HEALTHY_STATES and not hb):
        age = _age(status.get("started_at"), now)
        if age is not None and age <= start_grace:
            return Health(True, f"starting ({age:.0f} s)")
        return Health(False, f"still {state} after {start_grace:.0f} s without a heartbeat")
    if state not in HEALTHY_STATES:
        return Health(False, f"agent state is {state}: {status.get('last_error') or 'see its log'}")
    age = _age(hb.get("at"), now)
    if age is None or age > heartbeat_max_age:
        return Health(False, f"no heartbeat attempt for {'?' if age is None else f'{age:.0f}'} s: the agent is stuck")
    if hb.get("ok"):
        return Health(True, f"{state}; heartbeat ok {age:.0f} s ago")
    return Health(True, f"{state}; gateway unreachable ({hb.get('error')}); retrying")


def _age(stamp: object, now: datetime) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (now - when).total_seconds())


__all__ = [
    "FirstStart",
    "Health",
    "Installed",
    "TOKEN_CREDENTIAL",
    "UNIT_NAME",
    "first_start_token",
    "health",
    "install",
    "render_env_file",
    "render_unit",
]
