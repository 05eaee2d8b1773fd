"""``airflow edge-agents ...``: the admin commands of the hosted side.

    airflow edge-agents ca init [--json]
    airflow edge-agents ca rotate [--json]
    airflow edge-agents ca retire-old [--force] [--json]
    airflow edge-agents token create --queue Q [--queue Q2] --region R [--ttl 1h] [--uses 1] [--name N] [--json]
    airflow edge-agents queue set QUEUE [--regions R1,R2] [--logs hosted|local] [--json]
    airflow edge-agents queue list [--json]
    airflow edge-agents queue delete QUEUE
    airflow edge-agents list [--json]
    airflow edge-agents revoke AGENT [--json]
    airflow edge-agents drain AGENT [--json]
    airflow edge-agents resume AGENT [--json]
    airflow edge-agents explain DAG_ID TASK_ID RUN_ID [--map-index N] [--try N] [--json]
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

from executor_plugin.cli_explain import EXPLAIN_COMMAND

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
    from executor_plugin.settings import SettingsError
    from executor_plugin.store import StoreError

    if isinstance(exc, SQLAlchemyError):
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return f"database error: {first} (is the database reachable, and did 'airflow db migrate' run?)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (PKIError, StoreError, SettingsError, OSError)):
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
def ca_rotate(args: argparse.Namespace) -> None:
    """Make a new CA current; the previous one stays trusted until ``ca retire-old``."""
    from executor_plugin.pki import CertificateAuthority

    settings = _settings()
    ca, old_pin = CertificateAuthority.rotate(settings.ca_dir)
    if args.json:
        _print_json(
            {"ca_dir": str(settings.ca_dir), "pin": f"sha256:{ca.pin.hex()}", "previous_pin": f"sha256:{old_pin.hex()}"}
        )
        return
    print(f"new CA pin:      sha256:{ca.pin.hex()}")
    print(f"previous CA pin: sha256:{old_pin.hex()} (still trusted)")
    print("Gateways sign with the new CA within seconds; agents keep working and move to it when they")
    print("renew their certificate. 'airflow edge-agents list' shows who still holds an old one; then run")
    print("'airflow edge-agents ca retire-old'. New registration tokens carry the new pin.")


@_one_line_errors
@_audited
def ca_retire_old(args: argparse.Namespace) -> None:
    """Drop the previous CA from the trust bundle once agents have moved to the current one."""
    from airflow.utils.session import create_session

    from executor_plugin import store
    from executor_plugin.models import AgentStatus
    from executor_plugin.pki import CertificateAuthority

    ca = CertificateAuthority.load(_settings().ca_dir)
    if len(ca.bundle_pems()) < 2:
        if args.json:
            _print_json({"pin": f"sha256:{ca.pin.hex()}", "retired": []})
        else:
            print("nothing to retire: the trust bundle holds only the current CA")
        return
    now = store.utcnow()
    with create_session(scoped=False) as session:
        holders = [
            agent
            for agent in store.list_agents(session)
            if agent.state != AgentStatus.REVOKED
            and agent.cert_issuer != ca.pin.hex()
            and (agent.cert_not_after is None or agent.cert_not_after > now)
        ]
    if holders and not args.force:
        raise UsageError(
            f"{len(holders)} agent(s) still hold a certificate of an old CA ({', '.join(a.id for a in holders)}): "
            "they move over when they renew; wait, revoke them, or pass --force (they must then register again)"
        )
    retired = ca.retire_old()
    if args.json:
        _print_json(
            {
                "pin": f"sha256:{ca.pin.hex()}",
                "retired": [f"sha256:{pin.hex()}" for pin in retired],
                "agents_cut_off": [a.id for a in holders],
            }
        )
        return
    for pin in retired:
        print(f"retired CA sha256:{pin.hex()}")
    print("Gateways refuse certificates of the retired CA within seconds, and at the TLS handshake after a restart.")
    if holders:
        print(f"these agents must register again: {', '.join(a.id for a in holders)}")


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

    from executor_plugin.policy import token_conflicts

    ca = CertificateAuthority.load(_settings().ca_dir)
    token = RegistrationToken.mint(ca.pin)
    with create_session(scoped=False) as session:
        conflicts = token_conflicts(queues, region, store.queue_policies(session, queues))
        if conflicts:
            raise UsageError(f"the token's scope contradicts a queue policy: {'; '.join(conflicts)}")
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
    """Show every registered agent, with whether it is online (heartbeat within the window)."""
    from airflow.utils.session import create_session

    from executor_plugin import store
    from executor_plugin.settings import agent_dead_after_from_conf

    dead_after = agent_dead_after_from_conf()
    with create_session(scoped=False) as session:
        agents = store.list_agents(session)
        running = store.running_job_counts(session)
    current_pin = _current_ca_pin()
    now = store.utcnow()
    rows = []
    for agent in agents:
        age = agent.heartbeat_age(now)
        online = agent.is_online(dead_after, now)
        rows.append(
            {
                "id": agent.id,
                "name": agent.name,
                "queues": list(agent.queues),
                "region": agent.region,
                "state": agent.state,
                "status": agent_status(agent.state, online=online, ever_seen=age is not None),
                "online": online,
                "heartbeat_age_seconds": round(age, 1) if age is not None else None,
                "slots_free": agent.slots_free,
                "slots_total": agent.slots_total,
                "running_jobs": running.get(agent.id, 0),
                "last_heartbeat": _iso(agent.last_heartbeat),
                "version": agent.version,
                "cert_not_after": _iso(agent.cert_not_after),
                "cert_serial": agent.cert_serial,
                "cert_issuer": agent.cert_issuer,
                "cert_ca": _ca_label(agent.cert_issuer, current_pin),
            }
        )
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
                "status": r["status"],
                "slots free/total": f"{r['slots_free']}/{r['slots_total']}",
                "running": r["running_jobs"],
                "last heartbeat": _age_text(r["heartbeat_age_seconds"]),
                "version": r["version"] or "-",
                "cert expires": r["cert_not_after"] or "-",
                "cert CA": r["cert_ca"],
            }
            for r in rows
        ]
    )


#: Every value of the ``status`` column of ``airflow edge-agents list``.
AGENT_STATUSES = ("online", "offline", "draining", "draining (offline)", "revoked", "never seen")


def agent_status(state: str, *, online: bool, ever_seen: bool) -> str:
    """One word for the operator: the agent row's state combined with its liveness.

    ``revoked`` wins (nothing it does matters any more), then ``never seen`` (registered, no
    heartbeat yet: not started, or cannot reach the gateway), then draining with liveness.
    """
    from executor_plugin.models import AgentStatus

    if state == AgentStatus.REVOKED:
        return "revoked"
    if not ever_seen:
        return "never seen"
    if state == AgentStatus.DRAINING:
        return "draining" if online else "draining (offline)"
    return "online" if online else "offline"


def _age_text(age: float | None) -> str:
    if age is None:
        return "never"
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 2 * 3600:
        return f"{age / 60:.0f} min ago"
    return f"{age / 3600:.1f} h ago"


def _current_ca_pin() -> str | None:
    from executor_plugin.pki import CertificateAuthority, PKIError

    try:
        return CertificateAuthority.load(_settings().ca_dir).pin.hex()
    except PKIError:
        return None


def _ca_label(issuer: str | None, current_pin: str | None) -> str:
    """``current`` or ``old`` (a previous CA: renewal pending), ``unknown`` when not recorded."""
    if issuer is None or current_pin is None:
        return "unknown"
    return "current" if issuer == current_pin else "old"


def _agent_row(agent: Any) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "state": agent.state,
        "queues": list(agent.queues),
        "region": agent.region,
    }


def _agent_command(change: Callable[[Any, str], Any], agent_id: str) -> Any:
    """Run a store change on one agent; an unknown id is a usage error."""
    from airflow.utils.session import create_session

    from executor_plugin import store

    with create_session(scoped=False) as session:
        try:
            return change(session, agent_id)
        except store.AgentNotFound:
            raise UsageError(f"no agent {agent_id!r}: see 'airflow edge-agents list'") from None


@_one_line_errors
@_audited
def agents_revoke(args: argparse.Namespace) -> None:
    """Revoke an agent: its certificate is refused from now on, even on open long-polls."""
    from executor_plugin import store

    revocation = _agent_command(store.revoke_agent, args.agent)
    if args.json:
        _print_json(
            {
                **_agent_row(revocation.agent),
                "requeued_jobs": revocation.requeued,
                "running_jobs": list(revocation.running),
            }
        )
        return
    print(f"revoked agent {revocation.agent.id}: every request with its certificate is refused from now on")
    print(f"{revocation.requeued} leased job(s) went back to the queue")
    if revocation.running:
        print(
            f"{len(revocation.running)} running job(s) cannot reach Airflow any more and fail when Airflow's "
            f"task heartbeat times out: {', '.join(revocation.running)}"
        )


@_one_line_errors
@_audited
def agents_drain(args: argparse.Namespace) -> None:
    """Stop handing an agent new jobs; it finishes what it runs."""
    from executor_plugin import store

    agent = _agent_command(_revoked_is_usage(store.drain_agent), args.agent)
    if args.json:
        _print_json(_agent_row(agent))
        return
    print(f"agent {agent.id} is draining: it gets no new jobs and is asked to drain at its next heartbeat")


@_one_line_errors
@_audited
def agents_resume(args: argparse.Namespace) -> None:
    """Hand an agent new jobs again after ``drain``."""
    from executor_plugin import store

    agent = _agent_command(_revoked_is_usage(store.resume_agent), args.agent)
    if args.json:
        _print_json(_agent_row(agent))
        return
    print(f"agent {agent.id} is active again")


def _revoked_is_usage(change: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def wrapped(session: Any, agent_id: str) -> Any:
        from executor_plugin.store import AgentRevoked

        try:
            return change(session, agent_id)
        except AgentRevoked as exc:
            raise UsageError(str(exc)) from None

    return wrapped


# -- queue policies ------------------------------------------------------------------------------------


def parse_regions(text: str) -> tuple[str, ...]:
    from executor_plugin.policy import PolicyError, validate_region_patterns

    try:
        return validate_region_patterns(part for part in text.split(",") if part.strip())
    except PolicyError as exc:
        raise UsageError(f"--regions: {exc}") from None


def _policy_row(policy: Any) -> dict[str, Any]:
    return {
        "queue": policy.queue,
        "regions": list(policy.regions) if policy.regions is not None else None,
        "logs": policy.logs,
        "updated_at": _iso(policy.updated_at),
    }


def _regions_text(regions: Sequence[str] | None) -> str:
    return ", ".join(regions) if regions is not None else "any"


@_one_line_errors
@_audited
def queue_set(args: argparse.Namespace) -> None:
    """Create or change a queue's policy: allowed regions and where task logs go."""
    [queue] = validate_queues([args.queue])
    regions = parse_regions(args.regions) if args.regions is not None else None
    if args.logs is not None and args.logs not in ("hosted", "local"):
        raise UsageError(f"--logs must be hosted or local, not {args.logs!r}")
    if regions is None and args.logs is None:
        raise UsageError("give --regions and/or --logs: what the policy of this queue should say")

    from airflow.utils.session import create_session

    from executor_plugin import store
    from executor_plugin.policy import excluded_agents

    with create_session(scoped=False) as session:
        policy = store.set_queue_policy(session, queue, regions=regions, logs=args.logs)
        excluded = excluded_agents(policy, store.list_agents(session))
    if args.json:
        _print_json({**_policy_row(policy), "excluded_agents": [{"id": a.id, "region": a.region} for a in excluded]})
        return
    print(f"queue {policy.queue}: regions {_regions_text(policy.regions)}; logs {policy.logs}")
    for agent in excluded:
        print(f"excludes agent {agent.id} ({agent.name}, region {agent.region}): it gets no more jobs of this queue")


@_one_line_errors
def queue_list(args: argparse.Namespace) -> None:
    """Show every queue policy."""
    from airflow.utils.session import create_session

    from executor_plugin import store

    with create_session(scoped=False) as session:
        policies = store.list_queue_policies(session)
    if args.json:
        _print_json([_policy_row(policy) for policy in policies])
        return
    if not policies:
        print("No queue policies: every queue may run in any region and ships its logs.")
        return
    from airflow.cli.simple_table import AirflowConsole

    AirflowConsole().print_as_table(
        [
            {"queue": p.queue, "regions": _regions_text(p.regions), "logs": p.logs, "updated": _iso(p.updated_at)}
            for p in policies
        ]
    )


@_one_line_errors
@_audited
def queue_delete(args: argparse.Namespace) -> None:
    """Remove a queue's policy (the queue may then run in any region, logs hosted)."""
    [queue] = validate_queues([args.queue])
    from airflow.utils.session import create_session

    from executor_plugin import store

    with create_session(scoped=False) as session:
        if not store.delete_queue_policy(session, queue):
            raise UsageError(f"queue {queue!r} has no policy: see 'airflow edge-agents queue list'")
    print(f"queue {queue}: policy removed; it may run in any region and ships its logs")


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
ARG_AGENT = Arg(("agent",), help="Agent id (see 'airflow edge-agents list')", metavar="AGENT")
ARG_QUEUE_NAME = Arg(("queue",), help="Queue name", metavar="QUEUE")
ARG_REGIONS = Arg(
    ("--regions",),
    help="Comma-separated regions the queue's tasks may run in; fnmatch patterns allowed, e.g. 'eu-*' "
    "('*' for any)",
    metavar="R1,R2",
)
ARG_LOGS = Arg(
    ("--logs",),
    help="hosted: task logs are shipped and shown in the UI; local: they never leave the agent's region",
    metavar="hosted|local",
)
ARG_FORCE = Arg(("--force",), help="Retire even if agents still hold certificates of the old CA", action="store_true")
ARG_HOST = Arg(("--host",), help="Address to listen on (default 127.0.0.1)", default="127.0.0.1")
ARG_PORT = Arg(("--port",), help="Port to listen on (default 8443)", default="8443")

CA_COMMANDS = (
    ActionCommand(
        name="init",
        help="Create the agent CA (does nothing if it exists) and print its pin",
        func=ca_init,
        args=(ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="rotate",
        help="Make a new CA current; the previous one stays trusted while agents renew",
        func=ca_rotate,
        args=(ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="retire-old",
        help="Drop the previous CA from the trust bundle once every agent renewed",
        func=ca_retire_old,
        args=(ARG_FORCE, ARG_JSON, ARG_VERBOSE),
    ),
)

QUEUE_COMMANDS = (
    ActionCommand(
        name="set",
        help="Create or change a queue's policy (allowed regions, log placement)",
        description=(
            "Set where a queue's tasks may run and where their logs go. Applies to the next lease at "
            "once, also for agents registered before; agents it excludes are listed."
        ),
        func=queue_set,
        args=(ARG_QUEUE_NAME, ARG_REGIONS, ARG_LOGS, ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(name="list", help="List queue policies", func=queue_list, args=(ARG_JSON, ARG_VERBOSE)),
    ActionCommand(
        name="delete", help="Remove a queue's policy", func=queue_delete, args=(ARG_QUEUE_NAME, ARG_VERBOSE)
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
    GroupCommand(name="queue", help="Manage queue policies (regions, logs)", subcommands=QUEUE_COMMANDS),
    ActionCommand(
        name="list",
        help="List registered agents and their status (online, offline, draining, revoked, never seen)",
        func=agents_list,
        args=(ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="revoke",
        help="Revoke an agent at once (its leased jobs are requeued)",
        func=agents_revoke,
        args=(ARG_AGENT, ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="drain",
        help="Stop giving an agent new jobs; it finishes what it runs",
        func=agents_drain,
        args=(ARG_AGENT, ARG_JSON, ARG_VERBOSE),
    ),
    ActionCommand(
        name="resume",
        help="Give a drained agent new jobs again",
        func=agents_resume,
        args=(ARG_AGENT, ARG_JSON, ARG_VERBOSE),
    ),
    EXPLAIN_COMMAND,
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
            help="Manage edge agents: CA, registration tokens, queue policies, agents, gateway",
            subcommands=EDGE_AGENTS_COMMANDS,
        )
    ]


__all__ = [
    "AGENT_STATUSES",
    "UsageError",
    "agent_status",
    "get_cli_commands",
    "parse_regions",
    "parse_ttl",
    "validate_queues",
    "validate_region",
]
