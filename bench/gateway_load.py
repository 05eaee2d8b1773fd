"""The gateway under 1,000 concurrent long-polling agents: wake-up latency, CPU and memory.

Simulated agents, real everything else: each client registers through ``POST /agents/v1/register``
with a token of its own (one queue each, so exactly one client may take a given job), keeps its
own mTLS connection with its own certificate, and holds ``POST /agents/v1/lease`` open, re-polling
when the wait ends, as ``edge-agent run`` does. Then, one at a time, a job is queued for a random
client's queue (through :mod:`bench.dbhelper`, i.e. the store, as the executor would) and the
time from its commit to that client holding the lease is recorded.

Measured: wake latency (median, p95), the gateway's CPU (``/proc`` utime+stime) while the clients
idle and while jobs are queued, its RSS/PSS, its open sockets, and how long registration took.
``gateway_listeners`` says which wake-up was measured: the number of the gateway's PostgreSQL
``LISTEN`` connections open after the wake-ups (1: woken by the enqueue's ``NOTIFY``; 0: by polling;
None on SQLite).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import procstat
from bench.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
REGION = "bench-lp"
LEASE_WAIT_SECONDS = 50.0
#: How many registrations / first connections run at once (a burst of 1,000 TLS handshakes would
#: measure the ramp, not the steady state).
RAMP_CONCURRENCY = 25
WAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 300.0
SETTLE_SECONDS = 3.0


class LoadError(RuntimeError):
    """The gateway test could not run (helper, registration or connection failure)."""


class DbHelper:
    """``python -m bench.dbhelper`` with the hosted environment; one request at a time."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dbhelper"], env=dict(env), cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        from bench.dbhelper import REPLY_PREFIX

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                reply = json.loads(line[len(REPLY_PREFIX):])
                if "error" in reply:
                    raise LoadError(f"dbhelper {request.get('op')}: {reply['error']}")
                return reply
        raise LoadError(f"dbhelper exited ({self.proc.wait()}); see {self._log.name}")

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@dataclass
class Identity:
    queue: str
    agent_id: str
    pem_path: Path


@dataclass
class _Clients:
    """Shared state of the simulated agents."""

    waiting: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    expected: int = 0
    polls: int = 0
    in_flight: int = 0
    connected: int = 0
    errors: int = 0
    unexpected: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)


async def _register_all(
    gateway_url: str, ca_file: Path, tokens: list[str], queues: list[str], out_dir: Path
) -> list[Identity]:
    from cryptography.hazmat.primitives import serialization

    from edge_agent.fsutil import atomic_write
    from edge_agent.identity.pki_utils import generate_key, make_csr
    from edge_agent.protocol import REGISTER_PATH, AgentIdentity, RegisterRequest

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    verify = ssl.create_default_context(cafile=str(ca_file))
    gate = asyncio.Semaphore(RAMP_CONCURRENCY)

    async def one(client: httpx.AsyncClient, token: str, queue: str) -> Identity:
        key = await asyncio.to_thread(generate_key)
        body = RegisterRequest(token=token, csr_pem=make_csr(key, queue), name=queue, version="bench")
        async with gate:
            reply = await client.post(REGISTER_PATH, json=body.model_dump(mode="json"))
        if reply.status_code != 200:
            raise LoadError(f"register {queue}: {reply.status_code} {reply.text[:300]}")
        ident = AgentIdentity.model_validate(reply.json())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = out_dir / f"{queue}.pem"
        atomic_write(path, ident.cert_pem.encode() + key_pem, 0o600)  # a private key: 0600
        return Identity(queue=queue, agent_id=ident.agent_id, pem_path=path)

    limits = httpx.Limits(max_connections=RAMP_CONCURRENCY, max_keepalive_connections=RAMP_CONCURRENCY)
    async with httpx.AsyncClient(base_url=gateway_url, verify=verify, timeout=60, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, t, q) for t, q in zip(tokens, queues))))


async def _agent(
    ident: Identity, gateway_url: str, ca_file: Path, state: _Clients, ramp: asyncio.Semaphore
) -> None:
    from edge_agent.protocol import LEASE_PATH, WHOAMI_PATH, LeaseRequest, LeaseResponse

    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(str(ident.pem_path))
    body = LeaseRequest(free_slots=1, wait_seconds=LEASE_WAIT_SECONDS).model_dump(mode="json")
    timeout = httpx.Timeout(LEASE_WAIT_SECONDS + 30, connect=60)
    # One connection per simulated agent, kept alive across polls, as the real agent keeps one.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=gateway_url, verify=ctx, timeout=timeout, limits=limits) as client:
        # Connect (TLS handshake with the client certificate) under the ramp, with a cheap
        # authenticated call, so at most RAMP_CONCURRENCY handshakes run at once.
        async with ramp:
            reply = await client.get(WHOAMI_PATH)
        if reply.status_code != 200:
            state.errors += 1
            state.all_connected.set()  # stop the caller's wait: the test has failed
            raise LoadError(f"whoami {ident.queue}: {reply.status_code} {reply.text[:200]}")
        state.connected += 1
        if state.connected == state.expected:
            state.all_connected.set()
        while not state.stop.is_set():
            state.in_flight += 1
            state.polls += 1
            poll = asyncio.ensure_future(client.post(LEASE_PATH, json=body))
            stopper = asyncio.ensure_future(state.stop.wait())
            try:
                done, _ = await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if poll not in done:
                    poll.cancel()
                    return
                reply = poll.result()
                received = time.monotonic()
            except httpx.HTTPError:
                state.errors += 1
                await asyncio.sleep(1.0)  # a failed poll: back off as an agent would
                continue
            finally:
                stopper.cancel()
                state.in_flight -= 1
            if reply.status_code != 200:
                state.errors += 1
                await asyncio.sleep(1.0)
                continue
            lease = LeaseResponse.model_validate(reply.json()).lease
            if lease is None:
                continue
            waiter = state.waiting.pop(lease.queue, None)
            if waiter is None or waiter.done():
                state.unexpected += 1  # a job this client was not meant to get: counted, not fatal
            else:
                waiter.set_result(received)


def _listeners(env: Mapping[str, str]) -> int | None:
    """Open gateway LISTEN connections on the stack's PostgreSQL (None: not PostgreSQL)."""
    url = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url.startswith("postgresql"):
        return None
    import psycopg
    from sqlalchemy import make_url

    from executor_plugin.gateway.pg_listen import APPLICATION_NAME, connect_kwargs_for

    with psycopg.connect(autocommit=True, **connect_kwargs_for(make_url(url))) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APPLICATION_NAME,)
        ).fetchone()
    return int(row[0]) if row else 0


def _cpu_percent(pid: int, seconds_before: float | None, started: float) -> float | None:
    now = procstat.cpu_seconds(pid)
    if now is None or seconds_before is None:
        return None
    return 100.0 * (now - seconds_before) / max(time.monotonic() - started, 1e-9)


async def run_longpoll(
    *,
    gateway_url: str,
    gateway_pid: int,
    ca_file: Path,
    hosted_env: Mapping[str, str],
    work_dir: Path,
    clients: int,
    samples: int,
    idle_seconds: float = 10.0,
    seed: int = 5,
) -> dict[str, Any]:
    """Run the whole test; return its figures (see the module docstring)."""
    rng = random.Random(seed)
    queues = [f"lp-{i:04d}" for i in range(clients)]
    work_dir.mkdir(parents=True, exist_ok=True)
    helper = DbHelper(hosted_env, work_dir / "dbhelper.log")
    state = _Clients(expected=clients)
    tasks: list[asyncio.Task[None]] = []
    try:
        tokens = (await asyncio.to_thread(helper.call, {"op": "tokens", "queues": queues, "region": REGION}))["tokens"]
        started = time.monotonic()
        identities = await _register_all(gateway_url, ca_file, tokens, queues, work_dir / "identities")
        register_seconds = time.monotonic() - started
        del tokens

        ramp = asyncio.Semaphore(RAMP_CONCURRENCY)
        started = time.monotonic()
        tasks = [asyncio.create_task(_agent(i, gateway_url, ca_file, state, ramp)) for i in identities]
        # Every client connected; its first poll is then sent at once.
        try:
            await asyncio.wait_for(state.all_connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            pass
        connect_seconds = time.monotonic() - started
        if state.connected < clients:
            raise LoadError(f"only {state.connected}/{clients} clients connected after {connect_seconds:.0f}s "
                            f"({state.errors} errors)")
        await asyncio.sleep(SETTLE_SECONDS)  # the last polls reach their wait
        sockets_held = procstat.open_sockets(gateway_pid)

        # Idle: 1,000 polls held, nothing queued.
        cpu0, t0 = procstat.cpu_seconds(gateway_pid), time.monotonic()
        await asyncio.sleep(idle_seconds)
        idle_cpu = _cpu_percent(gateway_pid, cpu0, t0)

        # Wake-ups, one at a time.
        latencies: list[float] = []
        timeouts = 0
        cpu0, t0 = procstat.cpu_seconds(gateway_pid), time.monotonic()
        for k in range(samples):
            queue = rng.choice(queues)
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            state.waiting[queue] = fut
            queued = await asyncio.to_thread(helper.call, {"op": "enqueue", "queue": queue, "key": f"s{k}-{queue}"})
            try:
                received = await asyncio.wait_for(fut, WAKE_TIMEOUT)
                latencies.append(received - float(queued["committed_at"]))
            except TimeoutError:
                timeouts += 1
                state.waiting.pop(queue, None)
            await asyncio.sleep(rng.uniform(0.2, 0.6))
        busy_cpu = _cpu_percent(gateway_pid, cpu0, t0)
        memory = procstat.tree_memory(gateway_pid)
        listeners = await asyncio.to_thread(_listeners, hosted_env)
        held_at_end = state.in_flight
    finally:
        state.stop.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        helper.close()
        # Throwaway identities of a throwaway CA, but private keys all the same: do not leave them.
        shutil.rmtree(work_dir / "identities", ignore_errors=True)

    return {
        "clients": clients,
        "samples": len(latencies),
        "timeouts": timeouts,
        "wake_ms_median": statistics.median(latencies) * 1000 if latencies else None,
        "wake_ms_p95": percentile(latencies, 95) * 1000 if latencies else None,
        "wake_ms_max": max(latencies) * 1000 if latencies else None,
        "wake_ms": [round(v * 1000, 2) for v in latencies],
        "gateway_cpu_idle_pct": idle_cpu,
        "gateway_cpu_busy_pct": busy_cpu,
        "gateway_rss_mb": memory.rss_mb,
        "gateway_pss_mb": memory.pss_mb,
        "gateway_sockets": sockets_held,
        "gateway_listeners": listeners,
        "polls_held_at_end": held_at_end,
        "client_errors": state.errors,
        "unexpected_leases": state.unexpected,
        "register_seconds": register_seconds,
        "connect_seconds": connect_seconds,
        "os_open_files_limit": _nofile(),
    }


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


__all__ = ["DbHelper", "LoadError", "raise_nofile", "run_longpoll"]


if os.name != "posix":  # pragma: no cover
    raise ImportError("the gateway load test reads /proc and needs Linux")
