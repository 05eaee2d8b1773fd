"""The ``edge-agent`` command line: ``register``, ``run``, ``status``, ``unregister``, ``audit verify``.

Each command is typed options, a docstring that answers the operator's questions, and one call into
the library. Errors from ``edge_agent.errors`` become one red line on stderr and an exit code in one
place (:class:`_ErrorMappingGroup`): 2 for usage/configuration, 1 for everything else; no traceback
for an error we expected. Heavy imports (httpx, cryptography, the agent) happen inside commands so
``edge-agent --help`` stays fast.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperGroup

from edge_agent import __version__
from edge_agent.errors import EdgeAgentError

if TYPE_CHECKING:
    from edge_agent.identity.keystore import StoredIdentity


class _ErrorMappingGroup(TyperGroup):
    """The one place that turns an expected error into a red line on stderr and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeAgentError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="edge-agent",
    help=(
        "Run Apache Airflow tasks on this machine for a hosted Airflow, over outbound-only mutual TLS.\n\n"
        "First 'edge-agent register' with the URL and one-time token your Airflow admin gave you "
        "('airflow edge-agents token create'), then 'edge-agent run' (usually as a service), and "
        "'edge-agent status' to see what it is doing."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Locals in a traceback could include the registration token.
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STATE_DIR_HELP = (
    "Where the identity, task logs and status live. Default: $EDGE_AGENT_STATE_DIR, else "
    "$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/edge-agent, else ~/.local/state/edge-agent."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run Apache Airflow tasks on this machine for a hosted Airflow, over outbound-only mutual TLS."""


@app.command()
def register(
    url: str = typer.Option(..., "--url", help="The agent gateway, e.g. https://agents.example.com:8443."),
    token: Optional[str] = typer.Option(
        None, "--token",
        help="The registration token. Visible to other users in the process list: prefer --token-file "
             "or $EDGE_AGENT_TOKEN.",
    ),
    token_file: Optional[str] = typer.Option(
        None, "--token-file", help="Read the token from this file, or from standard input with '-'."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="A name for this agent (default: the one in the token, else the agent id)."
    ),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    secret_backend: Optional[str] = typer.Option(
        None, "--secret-backend",
        help="Where the private key goes: 'file' (0600 in the state dir), 'keyring' (OS keyring), or "
             "'auto' (keyring only if a real one is available; $EDGE_AGENT_SECRET_BACKEND).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an identity already in the state dir."),
) -> None:
    """Register this machine as an agent with a one-time token, and store its identity.

    The token names the gateway's CA: the agent checks it before the secret is sent, so a wrong URL
    or an intercepting proxy fails safely. A private key is generated here and never leaves this
    machine. The queues and region the agent serves are fixed by the token, not by this command.
    """
    from edge_agent.config import AgentConfig, read_token
    from edge_agent.identity.enroll import register as enroll
    from edge_agent.identity.keystore import Keystore

    config = AgentConfig.for_registration(state_dir=state_dir, secret_backend=secret_backend)
    text = read_token(token, token_file)
    keystore = Keystore(config.state_dir, config.secret_backend)
    identity = enroll(url, text, name, keystore, __version__, replace=force, timeout=config.request_timeout)
    typer.secho(f"Registered with {identity.url}", fg=typer.colors.GREEN)
    _print_identity(identity, config.state_dir)
    typer.echo("\nNext: 'edge-agent run' (or start the service).")


@app.command()
def run(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    concurrency: Optional[int] = typer.Option(
        None, "--concurrency", "-c", help="Tasks run at the same time (default 4; $EDGE_AGENT_CONCURRENCY)."
    ),
    dags_folder: Optional[Path] = typer.Option(
        None, "--dags-folder",
        help="Where the DAG files are on this machine, if tasks use the local 'dags-folder' bundle "
             "($EDGE_AGENT_DAGS_FOLDER).",
    ),
    runtime_python: Optional[str] = typer.Option(
        None, "--runtime-python",
        help="The Python that has apache-airflow-task-sdk and your DAGs' dependencies (default: this "
             "agent's own; $EDGE_AGENT_RUNTIME_PYTHON). The agent's private key never enters it.",
    ),
    policy: Optional[Path] = typer.Option(
        None, "--policy",
        help="Local policy file narrowing which DAGs, bundles and queues this agent runs (TOML; default "
             "<state dir>/policy.toml if it exists; $EDGE_AGENT_POLICY).",
    ),
    url: Optional[str] = typer.Option(
        None, "--url", envvar="EDGE_AGENT_URL",
        help="Gateway URL for the first start, when there is no identity yet and a registration token is "
             "given ($EDGE_AGENT_URL).",
    ),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file",
        help="Register with this token file first if there is no identity yet (also "
             "$EDGE_AGENT_TOKEN_FILE or the systemd credential 'registration-token'); ignored afterwards.",
    ),
    drain_grace: Optional[float] = typer.Option(
        None, "--drain-grace", metavar="SECONDS",
        help="How long a drain (SIGTERM, Ctrl-C) waits for running tasks before cancelling them "
             "(default 540, which fits the systemd unit's TimeoutStopSec=600; $EDGE_AGENT_DRAIN_GRACE).",
    ),
    cancel_grace: Optional[float] = typer.Option(
        None, "--cancel-grace", metavar="SECONDS",
        help="How long a cancelled task gets between SIGTERM and SIGKILL (default 30; "
             "$EDGE_AGENT_CANCEL_GRACE).",
    ),
    log_format: str = typer.Option(
        "text", "--log-format", envvar="EDGE_AGENT_LOG_FORMAT",
        help="'text' or 'json' (one JSON object per line with the agent id and, on job records, the job "
             "and task ids; $EDGE_AGENT_LOG_FORMAT).",
    ),
    metrics_port: Optional[int] = typer.Option(
        None, "--metrics-port", envvar="EDGE_AGENT_METRICS_PORT", min=0, max=65535,
        help="Serve /healthz, /readyz and Prometheus /metrics on this port (off by default; "
             "$EDGE_AGENT_METRICS_PORT).",
    ),
    metrics_host: str = typer.Option(
        "127.0.0.1", "--metrics-host", envvar="EDGE_AGENT_METRICS_HOST",
        help="Address for --metrics-port (default loopback: the endpoints have no authentication).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Lease and run tasks until stopped.

    SIGTERM or Ctrl-C drains: no new tasks, running ones finish and are reported, then exit 0; a
    drain still running after --drain-grace cancels the tasks. A second signal cancels them at
    once (SIGTERM, then SIGKILL after --cancel-grace; reported failed with the reason); a third
    leaves at once. If the gateway is unreachable, tasks keep running and their state reports and
    logs wait in <state dir>/spool, delivered in order when it is back (or at the next start). A
    drain during an outage ends once the tasks have ended. Progress goes to stderr and to <state
    dir>/status.json ('edge-agent status'). Every job accepted or refused by the local policy is
    recorded in <state dir>/audit.log ('edge-agent audit verify'). The certificate is renewed with
    a new key at 70-90 % of its lifetime.
    """
    from edge_agent import signals
    from edge_agent.agent import Agent
    from edge_agent.client import AgentAPI
    from edge_agent.config import AgentConfig
    from edge_agent.identity.enroll import register as enroll
    from edge_agent.identity.keystore import Keystore
    from edge_agent.observability import bind_agent, configure_logging
    from edge_agent.policy import load_policy
    from edge_agent.service import first_start_token
    from edge_agent.transport import build_client

    configure_logging(verbose, log_format)
    config = AgentConfig.build(
        state_dir=state_dir, concurrency=concurrency, dags_folder=dags_folder, runtime_python=runtime_python,
        policy=policy, drain_grace=drain_grace, cancel_grace=cancel_grace,
    )
    local_policy = load_policy(config.policy_file, required=config.policy_required)
    keystore = Keystore(config.state_dir, config.secret_backend)
    first = first_start_token(has_identity=keystore.exists(), url=url, token_file=token_file)
    if first is not None:
        # A service's first start: register from the token it was installed with, then run.
        enroll(first.url, first.token, None, keystore, __version__, timeout=config.request_timeout)
    identity = keystore.load()
    bind_agent(identity.agent_id, identity.name)

    def client_factory(ident: "StoredIdentity") -> Any:
        return build_client(ident.url, ident, config.request_timeout)

    agent = Agent(config, identity, lambda: AgentAPI(client_factory(identity)), policy=local_policy,
                  keystore=keystore, client_factory=client_factory,
                  observe=None if metrics_port is None else (metrics_host, metrics_port))
    restore = signals.install(agent)
    try:
        code = agent.run()
    finally:
        restore()
    raise typer.Exit(code)


@app.command()
def status(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the gateway."),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Keep the view on screen and refresh it (Ctrl-C leaves; not with --json)."
    ),
    interval: float = typer.Option(
        2.0, "--interval", min=0.5, help="Seconds between refreshes with --watch (the gateway is asked every 5th)."
    ),
) -> None:
    """Show who this agent is, whether the gateway accepts it, and what a running agent is doing.

    Exits 0 when the gateway accepts this identity, 1 otherwise (usable as a health check).
    """
    from edge_agent.config import resolve_state_dir
    from edge_agent.identity.keystore import Keystore

    if watch and as_json:
        raise typer.BadParameter("--watch shows a live view; use --json without it", param_hint="--watch")
    sd = resolve_state_dir(state_dir)
    identity = Keystore(sd).load()
    if watch:
        _watch_status(identity, sd, timeout, interval)
        raise typer.Exit(0)
    report = _status_report(identity, sd, _probe_gateway(identity, timeout))
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_status(identity, report)
    raise typer.Exit(0 if report["gateway"]["accepted"] else 1)


def _status_report(identity: "StoredIdentity", sd: Path, gateway: dict[str, Any]) -> dict[str, Any]:
    from edge_agent.observability.status import STATUS_FILE, read_status
    from edge_agent.spool import usage_on_disk

    spooled = usage_on_disk(sd)
    return {
        "state_dir": str(sd),
        "identity": identity.public_summary(),
        "certificate_expired": identity.expired(),
        "gateway": gateway,
        "agent": read_status(sd / STATUS_FILE),
        # Read from disk, so it is right for a stopped agent too (what its next start replays).
        "spool": spooled.as_dict() if spooled is not None else None,
    }


def _watch_status(identity: "StoredIdentity", sd: Path, timeout: float, interval: float) -> None:
    """``status --watch``: the text view, redrawn in place every ``interval`` seconds until Ctrl-C."""
    import contextlib
    import io
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    gateway: dict[str, Any] = {}

    def render(tick: int) -> Text:
        if tick % 5 == 0:  # a TLS handshake per refresh would be noise in the gateway's log
            gateway.update(_probe_gateway(identity, timeout))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _print_status(identity, _status_report(identity, sd, dict(gateway)))
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return Text(buf.getvalue() + f"\n{stamp}: refreshing every {interval:g} s; Ctrl-C to leave")

    tick = 0
    with Live(render(tick), console=Console(), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                tick += 1
                live.update(render(tick), refresh=True)
        except KeyboardInterrupt:
            pass


service_app = typer.Typer(help="Install edge-agent as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")


@service_app.command("install")
def service_install(
    url: Optional[str] = typer.Option(None, "--url", help="Gateway URL the service registers with on its first start."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file",
        help="Registration token, copied to /etc/edge-agent/registration-token (0600) and handed to the "
             "service as a systemd credential; used once on the first start.",
    ),
    user: Optional[str] = typer.Option(
        None, "--user", help="Run as this existing user (default: a systemd DynamicUser, no account needed)."
    ),
    binary: Optional[str] = typer.Option(
        None, "--binary", help="Path of the edge-agent executable the unit starts (default: this one)."
    ),
    runtime_python: Optional[str] = typer.Option(None, "--runtime-python", help="Python that runs the tasks."),
    dags_folder: Optional[str] = typer.Option(None, "--dags-folder", help="Where the DAG files are on this machine."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Tasks run at the same time."),
    root: Path = typer.Option(Path("/"), "--root", help="Install below this directory (for images and tests)."),
) -> None:
    """Write the hardened systemd unit, its environment file and the registration token.

    Nothing is started: afterwards run 'systemctl daemon-reload && systemctl enable --now edge-agent'.
    Running it again updates the unit and keeps an edited environment file.
    """
    import shutil
    import sys

    from edge_agent.service import install

    exe = binary or shutil.which("edge-agent") or sys.argv[0]
    done = install(
        Path(exe).resolve(), user, root=root, token_file=token_file, url=url, runtime_python=runtime_python,
        dags_folder=dags_folder, concurrency=concurrency,
    )
    typer.echo(f"unit:      {done.unit}")
    typer.echo(f"env file:  {done.env_file}" + (" (kept: already present)" if done.env_file_kept else ""))
    if done.token:
        typer.echo(f"token:     {done.token} (0600, used once on first start)")
    typer.echo("next:      systemctl daemon-reload && systemctl enable --now edge-agent")


@app.command()
def health(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    max_age: float = typer.Option(
        90.0, "--max-age", help="Seconds since the last heartbeat attempt before the agent counts as stuck."
    ),
) -> None:
    """Exit 0 when the local 'edge-agent run' is alive and making progress (container/Kubernetes probe).

    Looks only at this machine: a gateway outage does not make the agent unhealthy, because
    restarting it would only kill its running tasks. Use 'status' to check the gateway.
    """
    from edge_agent.config import resolve_state_dir
    from edge_agent.observability.status import STATUS_FILE, read_status
    from edge_agent.service import health as check_health

    result = check_health(read_status(resolve_state_dir(state_dir) / STATUS_FILE), heartbeat_max_age=max_age)
    typer.echo(result.reason)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def doctor(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    url: Optional[str] = typer.Option(
        None, "--url", help="Check this gateway before registering (with --token-file for the CA pin)."
    ),
    token_file: Optional[str] = typer.Option(
        None, "--token-file", help="Registration token whose CA pin the gateway must match ('-' = stdin)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per network step."),
) -> None:
    """Check the way to the gateway: DNS, TCP, proxy, TLS, CA pin, interception, clock skew, identity.

    Each failed check comes with a one-line fix. Exits 0 only when every check passes.
    """
    from edge_agent.doctor import diagnose, format_report

    if url:
        from edge_agent.config import read_token
        from edge_agent.errors import TokenInvalid
        from edge_agent.protocol import RegistrationToken, TokenFormatError

        pins: list[bytes] = []
        if token_file:
            try:
                pins = [RegistrationToken.parse(read_token(None, token_file)).ca_pin]
            except TokenFormatError as exc:
                raise TokenInvalid(str(exc)) from None
        report = diagnose(url, pins=pins, timeout=timeout)
    else:
        from edge_agent.config import resolve_state_dir
        from edge_agent.identity.keystore import Keystore

        identity = Keystore(resolve_state_dir(state_dir)).load()
        report = diagnose(identity.url, ca_pems=identity.ca_pems, identity=identity, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        for line in format_report(report):
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def unregister(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    local_only: bool = typer.Option(
        False, "--local-only",
        help="Wipe this machine's identity even if the gateway cannot be told (an admin must then revoke "
             "the agent with 'airflow edge-agents revoke').",
    ),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the gateway."),
) -> None:
    """Remove this agent from the hosted side, then delete its key and certificate here.

    The server puts the agent's open jobs back in the queue. The audit log and task logs are kept.
    Refused while 'edge-agent run' uses the state dir. If the gateway cannot be reached nothing is
    deleted, unless --local-only.
    """
    from edge_agent.config import resolve_state_dir
    from edge_agent.identity.unregister import unregister as unenroll

    sd = resolve_state_dir(state_dir)
    if not yes:
        typer.confirm(f"Unregister the agent in {sd} and delete its key and certificate?", abort=True, err=True)
    result = unenroll(sd, local_only=local_only, timeout=timeout)
    who = f"agent {result.agent_id}" if result.agent_id else "the agent"
    typer.secho(f"Unregistered {who}" + (f" from {result.url}" if result.url else ""), fg=typer.colors.GREEN)
    _row("server", result.server)
    _row("local", f"key, certificate and identity deleted from {sd}")
    _row("audit log", f"kept: {result.audit_log}")


audit_app = typer.Typer(
    help="The local audit log of every job this agent accepted, refused and finished.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Check the audit log's hash chain: an edited, removed, reordered or cut line is reported.

    Exits 0 when the whole log verifies, 1 otherwise (the first bad line is named).
    """
    from edge_agent.audit import verify
    from edge_agent.config import resolve_state_dir

    result = verify(resolve_state_dir(state_dir))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    elif result.ok:
        span = f", {result.first_time} to {result.last_time}" if result.entries else ""
        typer.secho(f"{result.path}: OK, {result.entries} entries{span}", fg=typer.colors.GREEN)
    else:
        typer.secho(f"{result.path}: FAILED at line {result.first_bad_line}", fg=typer.colors.RED)
        for problem in result.problems:
            typer.echo(f"  line {problem.line}: {problem.kind}: {problem.detail}")
    raise typer.Exit(0 if result.ok else 1)


def _probe_gateway(identity: "StoredIdentity", timeout: float) -> dict[str, Any]:
    from edge_agent.client import AgentAPI, certificate_refused
    from edge_agent.errors import CertificateExpired, GatewayUnreachable, IdentityRejected
    from edge_agent.transport import build_client

    if identity.expired():
        return {"reachable": None, "accepted": False,
                "error": str(CertificateExpired(identity.cert_not_after))}
    api = AgentAPI(build_client(identity.url, identity, timeout))
    try:
        who = api.whoami()
    except IdentityRejected as exc:
        return {"reachable": True, "accepted": False, "error": str(exc)}
    except GatewayUnreachable as exc:
        if certificate_refused(identity, timeout):
            return {"reachable": True, "accepted": False,
                    "error": "the gateway answers but refuses this agent's certificate (expired, or issued by "
                             "a CA it no longer trusts): re-register with a new token"}
        return {"reachable": False, "accepted": False, "error": str(exc)}
    except EdgeAgentError as exc:
        return {"reachable": True, "accepted": False, "error": str(exc)}
    finally:
        api.close()
    return {"reachable": True, "accepted": True, "error": None, "agent_state": who.state,
            "queues": who.queues, "region": who.region}


def _expiry_text(not_after: datetime) -> str:
    left = not_after - datetime.now(timezone.utc)
    when = not_after.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if left.total_seconds() <= 0:
        return f"EXPIRED at {when}"
    hours = left.total_seconds() / 3600
    return f"expires {when} (in {hours:.1f} h)" if hours < 72 else f"expires {when} (in {hours / 24:.0f} days)"


def _row(label: str, value: object) -> None:
    typer.echo(f"  {label:<13}{value}")


def _print_identity(identity: "StoredIdentity", state_dir: Path) -> None:
    _row("agent id", identity.agent_id)
    _row("name", identity.name)
    _row("queues", ", ".join(identity.queues) or "-")
    _row("region", identity.region)
    _row("certificate", _expiry_text(identity.cert_not_after))
    _row("state dir", state_dir)


def _print_status(identity: "StoredIdentity", report: dict[str, Any]) -> None:
    typer.echo(f"Agent {identity.name} ({identity.agent_id})")
    _print_identity(identity, Path(report["state_dir"]))
    gw = report["gateway"]
    if gw["accepted"]:
        typer.secho(f"  {'gateway':<13}{identity.url}: reachable, identity accepted (state {gw['agent_state']})",
                    fg=typer.colors.GREEN)
    else:
        where = "reachable" if gw["reachable"] else "not reachable" if gw["reachable"] is False else "not asked"
        typer.secho(f"  {'gateway':<13}{identity.url}: {where}: {gw['error']}", fg=typer.colors.RED)
    st = report["agent"]
    spool = report.get("spool") or {}
    if st is None:
        _row("process", "no status file: 'edge-agent run' has not run with this state dir")
        _print_spool(spool, running=False)
        return
    if not st.get("alive"):
        _row("process", f"not running (last status {st.get('updated_at', '?')}, state {st.get('state')})")
        _print_spool(spool, running=False)
        return
    _row("process", f"pid {st.get('pid')} since {st.get('started_at')}, {st.get('state')}")
    _print_outage(st)
    if st.get("policy"):
        _row("policy", st["policy"])
    _row("slots", f"{st.get('free_slots')} free of {st.get('total_slots')}")
    hb = st.get("last_heartbeat") or {}
    if hb:
        _row("heartbeat", f"{'ok' if hb.get('ok') else 'FAILED'} at {hb.get('at')}"
             + (f": {hb['error']}" if hb.get("error") else ""))
    else:
        _row("heartbeat", "none yet")
    for loop, text in sorted((st.get("activity") or {}).items()):
        _row(loop, text)
    jobs = st.get("jobs") or []
    held = [j for j in jobs if j.get("phase") != "spooled"]
    replaying = len(jobs) - len(held)
    _row("jobs", (f"{len(held)} held" if held else "none")
         + (f", {replaying} from the spool being delivered" if replaying else ""))
    _print_spool(st.get("spool") or {}, running=True)
    for job in jobs:
        typer.echo(f"    {job['job_id']}  {job['dag_id']}.{job['task_id']}  run {job['run_id']}  try "
                   f"{job['try_number']}  {job['phase']}" + (f"  pid {job['pid']}" if job.get("pid") else ""))


def _print_outage(st: dict[str, Any]) -> None:
    """The running agent's own view of the gateway: an outage is shown with its start and length."""
    from edge_agent.observability.status import outage_seconds

    gw = st.get("gateway") or {}
    spooled = (st.get("spool") or {}).get("jobs") or 0
    if gw.get("reachable") is False:
        seconds = outage_seconds(gw)
        length = f"{seconds:.0f} s" if seconds is not None else "? s"
        typer.secho(f"  gateway unreachable since {gw.get('since')} ({length}): {gw.get('last_error')}; "
                    f"{spooled} job report(s) spooled", fg=typer.colors.RED)
    elif gw.get("reachable") is True:
        _row("connection", f"reachable since {gw.get('since')}")


def _print_spool(spool: dict[str, Any], *, running: bool) -> None:
    jobs = spool.get("jobs") or 0
    if not jobs:
        return
    if running:  # running jobs have a record too (their log cursor): not a sign of trouble by itself
        _row("spool", f"{jobs} job record(s), {spool.get('bytes', 0)} bytes")
    else:
        _row("spool", f"{jobs} job(s) with reports to deliver ({spool.get('bytes', 0)} bytes), replayed by "
                      "the next 'edge-agent run'")


def main() -> None:
    """Console entry point (``edge-agent``)."""
    app(prog_name="edge-agent")


if __name__ == "__main__":  # pragma: no cover
    main()
