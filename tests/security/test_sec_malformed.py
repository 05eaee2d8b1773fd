"""Malformed and oversized bodies on every agent route: each is refused with a 4xx (never a 5xx,
never a hang), changes nothing, and the gateway keeps serving afterwards.

The caller is a registered agent with a leased job (so the job routes get past authentication and
reach body validation); the register route is called without a certificate, as agents do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from secsupport import (
    agent_count,
    agent_row,
    enroll,
    job_row,
    lease_job,
    log_tree,
    mint_token,
    token_row,
)

from edge_agent.identity.pki_utils import generate_key, make_csr
from edge_agent.protocol import (
    HEARTBEAT_PATH,
    LEASE_PATH,
    MAX_LOG_CHUNK_BYTES,
    REGISTER_PATH,
    RENEW_PATH,
    TRUST_BUNDLE_PATH,
    WHOAMI_PATH,
    job_logs_path,
    job_state_path,
)

HUGE = 20 * 1024 * 1024


class Victim:
    def __init__(self, gw: Any, tmp_path: Any) -> None:
        self.gw = gw
        self.agent = enroll(gw, tmp_path)
        self.job_id = gw.enqueue(self.agent.identity.queues[0])
        self.lease = lease_job(gw, self.agent, self.job_id)
        self.token = mint_token(gw, queues=[gw.new_queue()])

    def valid_bodies(self) -> dict[str, tuple[str, dict[str, Any], bool]]:
        """route -> (path, a body the route would accept, whether a client certificate is used)."""
        fencing = self.lease.fencing
        return {
            "register": (
                REGISTER_PATH,
                {"token": str(self.token), "csr_pem": make_csr(generate_key(), "x"), "version": "sec"},
                False,
            ),
            "lease": (LEASE_PATH, {"free_slots": 1, "wait_seconds": 0}, True),
            "state": (job_state_path(self.job_id), {"fencing": fencing, "state": "running"}, True),
            "logs": (job_logs_path(self.job_id), {"fencing": fencing, "offset": 0, "data": "x\n"}, True),
            "heartbeat": (HEARTBEAT_PATH, {"free_slots": 1, "total_slots": 1, "version": "sec"}, True),
            "renew": (RENEW_PATH, {"csr_pem": make_csr(generate_key(), "x")}, True),
        }

    def snapshot(self) -> tuple:
        gw = self.gw
        return (
            job_row(gw, self.job_id), agent_row(gw, self.agent.agent_id), token_row(gw, self.token.token_id),
            agent_count(gw), log_tree(gw),
        )


@pytest.fixture(scope="module")
def victim(gateway, tmp_path_factory) -> Victim:
    return Victim(gateway, tmp_path_factory.mktemp("malformed"))


def _first_key(body: dict[str, Any]) -> str:
    return next(iter(body))


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _numbers(body: dict[str, Any], value: int) -> bytes:
    """Every numeric field set to ``value`` (the first field when there is none, so the body is
    never left valid)."""
    keys = [k for k, v in body.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return _json({**body, **{k: value for k in keys or [_first_key(body)]}})


# kind -> body builder from the route's valid body (bytes are sent as they are)
KINDS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "invalid_json": lambda body: _json(body)[:-3],
    "not_utf8": lambda body: b'{"\xff\xfe": 1}',
    "empty": lambda body: b"",
    "array": lambda body: b"[]",
    "null": lambda body: b"null",
    "string": lambda body: b'"hello"',
    "missing_fields": lambda body: b"{}",
    "extra_field": lambda body: _json({**body, "queues": ["admin"], "is_admin": True}),
    "wrong_type_object": lambda body: _json({**body, _first_key(body): {"$ne": None}}),
    "wrong_type_list": lambda body: _json({k: [v] for k, v in body.items()}),
    "huge_integer": lambda body: _numbers(body, 10**40),
    "negative_numbers": lambda body: _numbers(body, -1),
    "nan": lambda body: _json({**body, _first_key(body): 0}).replace(b": 0", b": NaN", 1),
    "infinity": lambda body: _json({**body, _first_key(body): 0}).replace(b": 0", b": Infinity", 1),
    "deep_nesting": lambda body: b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge_body": lambda body: b'{"pad": "' + b"a" * HUGE + b'"}',
    # Far beyond every field's max_length; 2 MiB keeps the run short (huge_body tests the 20 MB case).
    "huge_field": lambda body: _json({**body, _first_key(body): "a" * (2 * 1024 * 1024)}),
}

ROUTES = ["register", "lease", "state", "logs", "heartbeat", "renew"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("route", ROUTES)
def test_malformed_body_is_4xx_and_changes_nothing(gateway, victim, route, kind):
    path, body, with_cert = victim.valid_bodies()[route]
    payload = KINDS[kind](body)
    before = victim.snapshot()
    with gateway.client(victim.agent if with_cert else None, timeout=120) as c:
        r = c.post(path, content=payload, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (route, kind, r.status_code, r.text[:300])
    assert victim.snapshot() == before
    _still_healthy(gateway, victim)


def test_validation_errors_never_echo_the_input(gateway, victim):
    # A malformed registration still carries the token: the 422 reply must not reflect it (nor a
    # huge value back to the sender).
    secret_body = {"token": str(victim.token), "csr_pem": 5, "version": "sec"}
    huge_body = {"fencing": victim.lease.fencing, "offset": 0, "data": "a" * (MAX_LOG_CHUNK_BYTES + 1)}
    before = victim.snapshot()
    with gateway.client() as anonymous:
        secret = anonymous.post(REGISTER_PATH, json=secret_body)
    with gateway.client(victim.agent, timeout=120) as c:
        huge = c.post(job_logs_path(victim.job_id), json=huge_body)
    assert (secret.status_code, huge.status_code) == (422, 422)
    assert victim.token.secret not in secret.text
    assert len(huge.content) < 10_000
    assert victim.snapshot() == before


def test_huge_log_chunk_is_refused_and_nothing_is_written(gateway, victim):
    before = victim.snapshot()
    chunk = {"fencing": victim.lease.fencing, "offset": 0, "data": "a" * (MAX_LOG_CHUNK_BYTES + 1)}
    with gateway.client(victim.agent, timeout=120) as c:
        r = c.post(job_logs_path(victim.job_id), json=chunk)
    assert r.status_code == 422
    assert victim.snapshot() == before
    _still_healthy(gateway, victim)


@pytest.mark.parametrize(
    "job_id",
    ["x" * 10_000, "%00", "..%2f..%2fetc", "' OR '1'='1"],
    ids=["long", "nul", "traversal", "sql"],
)
def test_hostile_job_ids_are_4xx_and_change_nothing(gateway, victim, job_id):
    before = victim.snapshot()
    with gateway.client(victim.agent) as c:
        state = c.post(f"/agents/v1/jobs/{job_id}/state", json={"fencing": victim.lease.fencing, "state": "failed"})
        logs = c.post(
            f"/agents/v1/jobs/{job_id}/logs", json={"fencing": victim.lease.fencing, "offset": 0, "data": "x"}
        )
    assert 400 <= state.status_code < 500 and 400 <= logs.status_code < 500, (state.text, logs.text)
    assert victim.snapshot() == before


def _still_healthy(gw: Any, victim: Victim) -> None:
    assert gw.proc.poll() is None, gw.log_text()
    with gw.client() as anonymous:
        assert anonymous.get(TRUST_BUNDLE_PATH).status_code == 200
    with gw.client(victim.agent) as c:
        assert c.get(WHOAMI_PATH).status_code == 200
