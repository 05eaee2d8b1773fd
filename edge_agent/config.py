"""The agent's configuration: one frozen object built once in ``cli.py`` from options and environment.

This is the only module that reads environment variables (and the token file); everything else gets
an :class:`AgentConfig` passed into its constructor.

State directory, first match wins: ``--state-dir`` > ``$EDGE_AGENT_STATE_DIR`` > ``$STATE_DIRECTORY``
(systemd ``StateDirectory=``) > ``$XDG_STATE_HOME/edge-agent`` > ``~/.local/state/edge-agent``.

Stop timing: ``--drain-grace`` (``$EDGE_AGENT_DRAIN_GRACE``, default 540 s) is how long a drain waits
for running tasks before cancelling them; ``--cancel-grace`` (``$EDGE_AGENT_CANCEL_GRACE``, default
30 s) is how long a cancelled task gets between SIGTERM and SIGKILL. The defaults fit the systemd
unit's ``TimeoutStopSec=600`` (540 + 30 + a margin for the last reports), so a stop never ends in
systemd killing tasks without a report.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, TextIO, cast

from edge_agent.errors import ConfigError

SecretBackend = Literal["auto", "keyring", "file"]
SECRET_BACKENDS: tuple[str, ...] = ("auto", "keyring", "file")

ENV_STATE_DIR = "EDGE_AGENT_STATE_DIR"
ENV_DAGS_FOLDER = "EDGE_AGENT_DAGS_FOLDER"
ENV_CONCURRENCY = "EDGE_AGENT_CONCURRENCY"
ENV_RUNTIME_PYTHON = "EDGE_AGENT_RUNTIME_PYTHON"
ENV_SECRET_BACKEND = "EDGE_AGENT_SECRET_BACKEND"
ENV_TOKEN = "EDGE_AGENT_TOKEN"
ENV_POLICY = "EDGE_AGENT_POLICY"
ENV_DRAIN_GRACE = "EDGE_AGENT_DRAIN_GRACE"
ENV_CANCEL_GRACE = "EDGE_AGENT_CANCEL_GRACE"
POLICY_FILE = "policy.toml"

MAX_CONCURRENCY = 256
#: systemd unit TimeoutStopSec (600) - cancel grace (30) - a margin for the last reports and teardown.
DEFAULT_DRAIN_GRACE = 540.0
DEFAULT_CANCEL_GRACE = 30.0
#: A week: longer is surely a typo (milliseconds?), and a drain that long blocks every restart.
MAX_GRACE = 7 * 24 * 3600.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    concurrency: int = 4
    runtime_python: str = sys.executable
    dags_folder: Path | None = None
    #: Defaults to ``<state_dir>/airflow`` (filled in by ``__post_init__``).
    runtime_airflow_home: Path = None  # type: ignore[assignment]
    #: Defaults to ``<state_dir>/logs``.
    log_folder: Path = None  # type: ignore[assignment]
    #: How long one lease long-poll may wait on the gateway (seconds).
    lease_wait: float = 30.0
    heartbeat_interval: float = 10.0
    secret_backend: SecretBackend = "auto"
    #: Timeout of one ordinary request to the gateway (connect, read, write).
    request_timeout: float = 30.0
    #: Directory for the forwarder's Unix socket (``$RUNTIME_DIRECTORY`` under systemd); None = a
    #: private temporary directory (Unix socket paths are limited to ~100 bytes, state dirs can be long).
    runtime_dir: Path | None = None
    #: The local policy file (``policy.py``); None = no file given and none at the default path.
    policy_file: Path | None = None
    #: The operator named ``policy_file`` (option or env): a missing file is then an error, not "no policy".
    policy_required: bool = False
    #: Seconds a drain (first SIGTERM) waits for running tasks before it cancels them.
    drain_grace: float = DEFAULT_DRAIN_GRACE
    #: Seconds a cancelled task gets between SIGTERM and SIGKILL.
    cancel_grace: float = DEFAULT_CANCEL_GRACE

    def __post_init__(self) -> None:
        if self.runtime_airflow_home is None:
            object.__setattr__(self, "runtime_airflow_home", self.state_dir / "airflow")
        if self.log_folder is None:
            object.__setattr__(self, "log_folder", self.state_dir / "logs")

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @classmethod
    def build(
        cls,
        *,
        state_dir: Path | str | None = None,
        concurrency: int | None = None,
        runtime_python: str | None = None,
        dags_folder: Path | str | None = None,
        secret_backend: str | None = None,
        policy: Path | str | None = None,
        lease_wait: float = 30.0,
        heartbeat_interval: float = 10.0,
        request_timeout: float = 30.0,
        drain_grace: float | None = None,
        cancel_grace: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> "AgentConfig":
        """Merge explicit options over the environment and defaults, and validate the result."""
        env = os.environ if env is None else env
        sd = resolve_state_dir(state_dir, env)

        conc: int | str | None = concurrency if concurrency is not None else env.get(ENV_CONCURRENCY)
        try:
            conc_i = 4 if conc in (None, "") else int(conc)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"concurrency must be a whole number, got {conc!r} (from ${ENV_CONCURRENCY})") from None
        if not 1 <= conc_i <= MAX_CONCURRENCY:
            raise ConfigError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {conc_i}")

        python = runtime_python or env.get(ENV_RUNTIME_PYTHON)
        if not python:
            if getattr(sys, "frozen", False):  # a standalone binary: sys.executable is the binary itself
                raise ConfigError(
                    "this edge-agent is a standalone binary with no Python to run tasks: pass --runtime-python "
                    f"PATH (or ${ENV_RUNTIME_PYTHON}) naming a Python with apache-airflow-task-sdk and edge-agent"
                )
            python = sys.executable
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ConfigError(f"runtime python {python} is not an executable file (--runtime-python)")

        dags_raw = dags_folder if dags_folder not in (None, "") else env.get(ENV_DAGS_FOLDER) or None
        dags = Path(dags_raw).expanduser().absolute() if dags_raw else None
        if dags is not None and not dags.is_dir():
            raise ConfigError(f"DAGs folder {dags} does not exist or is not a directory (--dags-folder)")

        backend = _secret_backend(secret_backend, env)

        for name, value in (("lease wait", lease_wait), ("heartbeat interval", heartbeat_interval),
                            ("request timeout", request_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")

        drain = _grace("drain grace", "--drain-grace", drain_grace, ENV_DRAIN_GRACE, DEFAULT_DRAIN_GRACE, env)
        cancel = _grace("cancel grace", "--cancel-grace", cancel_grace, ENV_CANCEL_GRACE, DEFAULT_CANCEL_GRACE, env)

        rt_dir = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
        policy_file, policy_required = resolve_policy_file(policy, sd, env)
        return cls(
            state_dir=sd,
            concurrency=conc_i,
            runtime_python=python,
            dags_folder=dags,
            lease_wait=float(lease_wait),
            heartbeat_interval=float(heartbeat_interval),
            secret_backend=backend,
            request_timeout=float(request_timeout),
            runtime_dir=Path(rt_dir) if rt_dir else None,
            policy_file=policy_file,
            policy_required=policy_required,
            drain_grace=drain,
            cancel_grace=cancel,
        )

    @classmethod
    def for_registration(
        cls, *, state_dir: Path | str | None = None, secret_backend: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> "AgentConfig":
        """Only what ``register`` needs: a DAGs folder or runtime python set for ``run`` must not block it."""
        env = os.environ if env is None else env
        return cls(state_dir=resolve_state_dir(state_dir, env), secret_backend=_secret_backend(secret_backend, env))


def _grace(
    name: str, option_name: str, option: float | None, env_name: str, default: float, env: Mapping[str, str]
) -> float:
    """A grace period in seconds: option > env > default; a whole or decimal number from 0 to a week."""
    if option is not None:
        raw: object = option
        source = option_name
    elif env.get(env_name, "").strip():
        raw = env[env_name].strip()
        source = f"${env_name}"
    else:
        return default
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r} (from {source})") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_GRACE:
        raise ConfigError(
            f"{name} must be between 0 and {MAX_GRACE:.0f} seconds, got {raw!r} (from {source})"
        )
    return value


def _secret_backend(option: str | None, env: Mapping[str, str]) -> SecretBackend:
    backend = (option or env.get(ENV_SECRET_BACKEND) or "auto").lower()
    if backend not in SECRET_BACKENDS:
        raise ConfigError(f"secret backend must be one of {', '.join(SECRET_BACKENDS)}, got {backend!r}")
    return cast(SecretBackend, backend)


def resolve_state_dir(option: Path | str | None, env: Mapping[str, str] | None = None) -> Path:
    """Where identity, logs and status live (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if option not in (None, ""):
        chosen = Path(option)  # type: ignore[arg-type]
    elif env.get(ENV_STATE_DIR):
        chosen = Path(env[ENV_STATE_DIR])
    elif env.get("STATE_DIRECTORY"):
        # systemd passes a colon-separated list when StateDirectory= names several directories.
        chosen = Path(env["STATE_DIRECTORY"].split(":")[0])
    elif env.get("XDG_STATE_HOME"):
        chosen = Path(env["XDG_STATE_HOME"]) / "edge-agent"
    else:
        home = env.get("HOME") or str(Path.home())
        chosen = Path(home) / ".local" / "state" / "edge-agent"
    return chosen.expanduser().absolute()


def resolve_policy_file(
    option: Path | str | None, state_dir: Path, env: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """The policy file and whether the operator named it: ``--policy`` > ``$EDGE_AGENT_POLICY`` > default."""
    env = os.environ if env is None else env
    if option not in (None, ""):
        return Path(option).expanduser().absolute(), True  # type: ignore[arg-type]
    if env.get(ENV_POLICY):
        return Path(env[ENV_POLICY]).expanduser().absolute(), True
    return state_dir / POLICY_FILE, False


def read_token(
    token: str | None,
    token_file: str | None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> str:
    """Return the registration token text from ``--token``, ``--token-file PATH|-`` or ``$EDGE_AGENT_TOKEN``.

    Only the token's presence is checked here; its format is checked by ``enroll.register``.
    """
    env = os.environ if env is None else env
    if token and token_file:
        raise ConfigError("give either --token or --token-file, not both")
    if token_file == "-":
        text = (stdin or sys.stdin).readline()
        source = "standard input"
    elif token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        source = str(path)
    elif token:
        text, source = token, "--token"
    elif env.get(ENV_TOKEN):
        text, source = env[ENV_TOKEN], f"${ENV_TOKEN}"
    else:
        raise ConfigError(
            f"no registration token: pass --token-file PATH (or - for stdin), --token, or set ${ENV_TOKEN}"
        )
    text = text.strip()
    if not text:
        raise ConfigError(f"the registration token from {source} is empty")
    return text


__all__ = ["AgentConfig", "SECRET_BACKENDS", "SecretBackend", "read_token", "resolve_policy_file", "resolve_state_dir"]
