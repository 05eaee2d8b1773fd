"""``airflow edge-agents ...``: the admin commands of the hosted side.

    airflow edge-agents ca init [--json]
    airflow edge-agents token create --queue Q [--queue Q2] --region R [--ttl 1h] [--uses 1] [--name N] [--json]
    airflow edge-agents list [--json]
    airflow edge-agents gateway [--host 127.0.0.1] [--port 8443]

Airflow imports this module in every ``airflow`` command (provider info ``cli``), so at import time
it only builds the argparse description; each command imports what it needs when it runs.
Commands are thin: parse and validate input, call the CA or the store, print. Every failure ends
as one line on stderr and a non-zero exit (``--verbose`` shows the traceback).

The registration token is the only secret any command prints, and only ``token create`` does.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand

if TYPE_CHECKING:
    import argparse

    from executor_plugin.settings import HostedSettings

#: Exit status for input the command refuses (argparse uses 2 for the same purpose).
EXIT_USAGE = 2
#: Exit status for everything else that went wrong.
EXIT_FAILURE = 1

MAX_TOKEN_TTL = timedelta(hours=24)
DEFAULT_TOKEN_TTL = "1h"
# Queue and region names end up in policies, logs and certificates' scope: keep them to a safe,
# unambiguous alphabet, and within the columns' lengths (models.py).
QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_MAX = 200
_TTL_RE = re.compile(r"^(\d+)([smhd])$")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """The command's input is invalid; the message says what to change."""


# ---------------------------------------------------------------------------------------------------
# Input parsing (pure)
# ---------------------------------------------------------------------------------------------------


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``1d`` -> timedelta; at most 24 h."""
    match = _TTL_RE.match(text.strip())
    if not match:
        raise UsageError(f"invalid --ttl {text!r}: use a number with s, m, h or d, e.g. 90s, 15m, 1h")
    ttl = timedelta(seconds=int(match.group(1)) * _TTL_UNITS[match.group(2)])
    if ttl <= timedelta(0):
        raise UsageError("--ttl must be longer than zero")
    if ttl > MAX_TOKEN_TTL:
        raise UsageError("--ttl must be at most 24h: a registration token is meant to be used right away")
    return ttl


def validate_queues(queues: Sequence[str] | None) -> list[str]:
    if not queues:
        raise UsageError("give at least one --queue: an agent may only run tasks of the queues its token grants")
    for queue in queues:
        if not QUEUE_RE.match(queue):
            raise UsageError(
                f"invalid queue {queue!r}: use letters, digits, '_', '.' and '-' (starting with a letter "
                "or digit, at most 256 characters)"
            )
    return list(dict.fromkeys(queues))  # drop repeats, keep order


def validate_region(region: str | None) -> str:
    if not region:
        raise UsageError("give --region: the region the agent runs in, e.g. eu-west-1")
    if not REGION_RE.match(region):
        raise UsageError(
            f"invalid region {region!r}: use letters, digits, '_', '.' and '-' (starting with a letter or "
            "digit, at most 64 characters)"
        )
    return region


def validate_uses(uses: int) -> int:
    if uses < 1:
        raise UsageError("--uses must be at least 1")
    return uses


def validate_name(name: str | None) -> str | None:
    if name is not None and (not name.strip() or len(name) > NAME_MAX or not name.isprintable()):
        raise UsageError(f"--name must be 1 to {NAME_MAX} printable characters")
    return name


def _whole_number(text: str) -> int:
    # Parsed here rather than with argparse's type=int so a bad value gives our one-line error.
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"expected a whole number, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------
# Error handling shared by every command
# ---------------------------------------------------------------------------------------------------


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _one_line_errors(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Turn every failure into ``error: <one line>`` on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> None:
        from airflow.cli.utils import redirect_stdout_log_handlers_to_stderr

        # Log lines on stdout would corrupt --json output (and mix with the token line).
        redirect_stdout_log_handlers_to_stderr()
        try:
            func(args)
        except UsageError as exc:
            _fail(str(exc), EXIT_USAGE)
        except Exception as exc:
            if getattr(args, "verbose", False):
                raise
            _fail(_describe(exc), EXIT_FAILURE)

    return wrapper


def _describe(exc: BaseException) -> str:
    from sqlalchemy.exc import SQLAlchemyError

    from executor_plugin.pki import PKIError
    from executor_plugin.store import StoreError

    if isinstance(exc, SQLAlchemyError):
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return f"database error: {first} (is the database reachable, and did 'airflow db migrate' run?)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (PKIError, StoreError, OSError)):
        return text
    return f"{type(exc).__name__}: {text} (run with --verbose for details)"


def _settings() -> HostedSettings:
    from executor_plugin.settings import HostedSettings

    return HostedSettings.from_airflow_conf()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _audited(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Record the command line in Airflow's audit log (``log`` table), as Airflow's own commands do.

    The command line holds no secret: the token is only ever printed, never passed in.
    """

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> None:
        from airflow.utils.cli import action_cli

        action_cli(check_db=False)(func)(args)

    return wrapper


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------


@_one_line_errors
@_audited
def ca_init(args: argparse.Namespace) -> None:
    """Create the CA in ``[edge_agent] ca_dir`` unless it exists."""
    from executor_plugin.pki import CertificateAuthority

    settings = _settings()
    ca, created = CertificateAuthority.init(settings.ca_dir)
    pin = f"sha256:{ca.pin.hex()}"
    if args.json:
        _print_json({"ca_dir": str(settings.ca_dir), "pin": pin, "created": created})
        return
    print(f"CA directory: {settings.ca_dir}")
    print(f"CA pin:       {pin}")
    print("created" if created else "already present")


@_one_line_errors
@_audited
def token_create(args: argparse.Namespace) -> None:
    """Mint a registration token bound to queues and a region; print it once."""
    queues = validate_queues(args.queue)
    region = validate_region(args.region)
    ttl = parse_ttl(args.ttl)
    uses = validate_uses(_whole_number(args.uses))
    name = validate_name(args.name)

    from airflow.utils.session import create_session

    from edge_agent.protocol import RegistrationToken
    from executor_plugin import store
    from executor_plugin.pki import CertificateAuthority

    ca = CertificateAuthority.load(_settings().ca_dir)
    token = RegistrationToken.mint(ca.pin)
    with create_session(scoped=False) as session:
        record = store.create_token(
            session,
            token_id=token.token_id,
            secret_hash=store.hash_secret(token.secret),
            queues=queues,
            region=region,
            name=name,
            ttl=ttl,
            max_uses=uses,
        )
    if args.json:
        _print_json(
            {
                "token": str(token),
                "token_id": record.id,
                "expires_at": _iso(record.expires_at),
                "queues": list(record.queues),
                "region": record.region,
                "uses": record.max_uses,
                "name": record.name,
            }
        )
        return
    print(str(token))
    print(
        f"token id {record.id}: queues {', '.join(record.queues)}; region {record.region}; "
        f"{record.max_uses} use(s); expires {_iso(record.expires_at)}",
        file=sys.stderr,
    )
    print("Give it to the agent's operator over a private channel:", file=sys.stderr)
    print("  edge-agent register --url https://<gateway> --token <token>", file=sys.stderr)


@_one_line_errors
def agents_list(args: argparse.Namespace) -> None:
    """Show every registered agent."""
    from airflow.utils.session import create_session

    from executor_plugin import store

    with create_session(scoped=False) as session:
        agents = store.list_agents(session)
        running = store.running_job_counts(session)
    rows = [
        {
            "id": agent.id,
            "name": agent.name,
            "queues": list(agent.queues),
            "region": agent.region,
            "state": agent.state,
            "slots_free": agent.slots_free,
            "slots_total": agent.slots_total,
            "running_jobs": running.get(agent.id, 0),
            "last_heartbeat": _iso(agent.last_heartbeat),
            "version": agent.version,
            "cert_not_after": _iso(agent.cert_not_after),
        }
        for agent in agents
    ]
    if args.json:
        _print_json(rows)
        return
    if not rows:
        print("No agents registered. Mint a token with 'airflow edge-agents token create'.")
        return
    from airflow.cli.simple_table import AirflowConsole

    AirflowConsole().print_as_table(
        [
            {
                "id": r["id"],
                "name": r["name"],
                "queues": ",".join(r["queues"]),
                "region": r["region"],
                "state": r["state"],
                "slots free/total": f"{r['slots_free']}/{r['slots_total']}",
                "running": r["running_jobs"],
                "last heartbeat": r["last_heartbeat"] or "never",
                "version": r["version"] or "-",
                "cert expires": r["cert_not_after"] or "-",
            }
            for r in rows
        ]
    )


@_one_line_errors
def gateway(args: argparse.Namespace) -> None:
    """Run the agent gateway (TLS, our CA) until interrupted."""
    port = _whole_number(args.port)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    from executor_plugin.gateway.server import serve

    serve(args.host, port, _settings())


# ---------------------------------------------------------------------------------------------------
# argparse description (what Airflow reads through the provider info)
# ---------------------------------------------------------------------------------------------------

ARG_JSON = Arg(("--json",), help="Print JSON instead of text", action="store_true")
ARG_VERBOSE = Arg(("-v", "--verbose"), help="Show the traceback of an unexpected error", action="store_true")
ARG_QUEUE = Arg(
    ("-q", "--queue"),
    help="Queue the agent may run tasks from; repeat for several (at least one)",
    action="append",
    metavar="QUEUE",
)
ARG_REGION = Arg(("-r", "--region"), help="Region the agent runs in, e.g. eu-west-1 (required)", metavar="REGION")
ARG_TTL = Arg(
    ("--ttl",),
    help=f"How long the token can be used: 90s, 15m, 1h, 1d (default {DEFAULT_TOKEN_TTL}, at most 24h)",
    default=DEFAULT_TOKEN_TTL,
)
ARG_USES = Arg(("--uses",), help="How many agents may register with the token (default 1)", default="1")
ARG_NAME = Arg(("--name",), help="Name for the agent (default: the name the agent sends)")
ARG_HOST = Arg(("--host",), help="Address to listen on (default 127.0.0.1)", default="127.0.0.1")
ARG_PORT = Arg(("--port",), help="Port to listen on (default 8443)", default="8443")

CA_COMMANDS = (
    ActionCommand(
        name="init",
        help="Create the agent CA (does nothing if it exists) and print its pin",
        func=ca_init,
        args=(ARG_JSON, ARG_VERBOSE),
    ),
)

TOKEN_COMMANDS = (
    ActionCommand(
        name="create",
        help="Mint a registration token for one or more agents",
        description=(
            "Mint a registration token scoped to queues and a region. The token carries the CA pin, "
            "so the agent can authenticate the gateway before it sends the secret. It is printed "
            "once and stored only as a hash."
        ),
        func=token_create,
        args=(ARG_QUEUE, ARG_REGION, ARG_TTL, ARG_USES, ARG_NAME, ARG_JSON, ARG_VERBOSE),
    ),
)

EDGE_AGENTS_COMMANDS = (
    GroupCommand(name="ca", help="Manage the agent certificate authority", subcommands=CA_COMMANDS),
    GroupCommand(name="token", help="Manage registration tokens", subcommands=TOKEN_COMMANDS),
    ActionCommand(
        name="list",
        help="List registered agents",
        func=agents_list,
        args=(ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="gateway",
        help="Run the agent gateway (agent API and Execution API over mutual TLS)",
        func=gateway,
        args=(ARG_HOST, ARG_PORT, ARG_VERBOSE),
    ),
)


def get_cli_commands() -> list[GroupCommand]:
    """Provider info ``cli`` entry: ``airflow edge-agents ...``."""
    return [
        GroupCommand(
            name="edge-agents",
            help="Manage edge agents: CA, registration tokens, agent list, gateway",
            subcommands=EDGE_AGENTS_COMMANDS,
        )
    ]


__all__ = ["UsageError", "get_cli_commands", "parse_ttl", "validate_queues", "validate_region"]
