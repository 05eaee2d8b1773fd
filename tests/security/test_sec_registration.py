"""Attacks on registration: a used or expired token, a request that tries to widen the token's
scope, a token minted against a queue policy, and a gateway impostor waiting for the secret.

Each test asserts the refusal and that nothing was spent or issued: the token's use count, the
agent rows, and (for the impostor) every byte the impostor's server received.
"""

from __future__ import annotations

import json
import ssl
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from secsupport import (
    agent_count,
    agents_of_token,
    airflow_cli,
    edge_agent_cli,
    mint_token,
    token_count,
    token_row,
)

from edge_agent.identity.pki_utils import generate_key, make_csr, pubkey_fingerprint
from edge_agent.protocol import REGISTER_PATH, TRUST_BUNDLE_PATH, RegistrationToken
from executor_plugin import store


def _body(token: RegistrationToken | str, key=None, **extra) -> dict:
    return {"token": str(token), "csr_pem": make_csr(key or generate_key(), "x"), "version": "sec", **extra}


def test_used_token_with_another_key_is_refused_and_spends_nothing(gateway, tmp_path):
    token = mint_token(gateway, queues=[gateway.new_queue()])
    first_key = generate_key()
    first = gateway.register(tmp_path, token=token, key=first_key)

    def state() -> tuple:
        return token_row(gateway, token.token_id), agents_of_token(gateway, token.token_id), agent_count(gateway)

    before = state()
    thief_key = generate_key()
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json=_body(token, thief_key))
    assert r.status_code == 401
    assert "already used" in r.json()["detail"]
    assert "cert_pem" not in r.text
    assert state() == before
    thief_fp = pubkey_fingerprint(thief_key.public_key())
    assert all(a["pubkey_fp"] != thief_fp for a in agents_of_token(gateway, token.token_id))
    # Control: the legitimate agent's retry with its own key is still the same registration.
    with gateway.client() as c:
        again = c.post(REGISTER_PATH, json=_body(token, first_key))
    assert again.status_code == 200 and again.json()["agent_id"] == first.agent_id
    assert token_row(gateway, token.token_id)["uses"] == 1


def test_expired_token_is_refused_and_spends_nothing(gateway):
    token = mint_token(gateway, queues=[gateway.new_queue()], ttl=timedelta(seconds=-1))
    before = (token_row(gateway, token.token_id), agent_count(gateway))
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json=_body(token))
    assert r.status_code == 401
    assert "expired" in r.json()["detail"]
    assert "cert_pem" not in r.text
    assert (token_row(gateway, token.token_id), agent_count(gateway)) == before
    assert agents_of_token(gateway, token.token_id) == []


@pytest.mark.parametrize(
    "widening",
    [
        {"queues": ["admin", "default"]},
        {"region": "eu-west-1"},
        {"agent_id": "ag_000000000000"},
    ],
    ids=["queues", "region", "agent_id"],
)
def test_register_request_cannot_widen_the_token_scope(gateway, tmp_path, widening):
    queue = gateway.new_queue()
    token = mint_token(gateway, queues=[queue], region="it-1")
    before = (token_row(gateway, token.token_id), agent_count(gateway))
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json=_body(token, **widening))
    assert r.status_code == 422, r.text
    assert (token_row(gateway, token.token_id), agent_count(gateway)) == before
    # The token is still good, and what it grants comes from its record alone.
    agent = gateway.register(tmp_path, token=token)
    assert (agent.identity.queues, agent.identity.region) == ([queue], "it-1")


def test_token_contradicting_a_queue_policy_is_refused_at_minting(gateway):
    queue = gateway.new_queue()
    with gateway.home.session() as s:
        store.set_queue_policy(s, queue, regions=["eu-*"])
        s.commit()
    before = token_count(gateway)
    minted = airflow_cli(gateway, "token", "create", "--queue", queue, "--region", "us-1", "--json")
    assert minted.returncode != 0
    assert "contradicts a queue policy" in minted.stderr
    assert "eat1_" not in minted.stdout + minted.stderr  # no token was printed
    assert token_count(gateway) == before
    # Control: a token inside the policy is minted.
    ok = airflow_cli(gateway, "token", "create", "--queue", queue, "--region", "eu-west-1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["region"] == "eu-west-1"
    assert token_count(gateway) == before + 1


def test_token_secret_is_stored_hashed_and_never_logged(gateway, tmp_path):
    # (Minted by 'token create' in test_token_contradicting_a_queue_policy_is_refused_at_minting.)
    token = mint_token(gateway, queues=[gateway.new_queue()])
    registered = edge_agent_cli(
        "register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"), stdin=str(token)
    )
    assert registered.returncode == 0, registered.stderr
    assert token_row(gateway, token.token_id)["uses"] == 1
    secret = token.secret.encode()
    for db_file in gateway.home.path.glob("airflow.db*"):  # the database and any journal beside it
        assert secret not in db_file.read_bytes(), db_file
    assert token.secret not in "".join(gateway.output)
    assert token.secret not in registered.stdout + registered.stderr
    assert not any(secret in p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# A gateway impostor
# ---------------------------------------------------------------------------------------------------


class ImpostorGateway:
    """A real TLS server with ANOTHER CA that answers the trust-bundle route like a gateway and
    records every request (line, headers, body) it receives."""

    def __init__(self, bundle_extra: list[str]) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.bundle = [self.ca.cert_pem.bytes().decode(), *bundle_extra]
        self.requests: list[tuple[str, str, str, bytes]] = []
        self._lock = threading.Lock()
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with impostor._lock:
                    impostor.requests.append((self.command, self.path, str(self.headers), body))

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._record()
                if self.path == TRUST_BUNDLE_PATH:
                    self._answer(200, {"ca_pems": impostor.bundle, "trust_domain": "evil.test"})
                else:
                    self._answer(404, {"detail": "not found"})

            def do_POST(self) -> None:
                self._record()
                self._answer(500, {"detail": "thanks"})

            do_PUT = do_PATCH = do_DELETE = do_POST

            def log_message(self, format: str, *args) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(ctx)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)

    def __enter__(self) -> ImpostorGateway:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def everything_received(self) -> bytes:
        with self._lock:
            return b"\n".join(f"{m} {p}\n{h}".encode() + b for m, p, h, b in self.requests)


@pytest.mark.parametrize(
    "bundle",
    ["impostor_ca_only", "real_ca_copied_in"],
)
def test_impostor_gateway_never_receives_the_token_secret(gateway, tmp_path: Path, bundle):
    # The token is pinned to our CA. The impostor either serves its own CA, or also copies our
    # (public) CA certificate into its bundle, hoping the pin matches and the agent goes on; it
    # cannot present a server certificate of our CA, so the agent must stop before sending.
    token = mint_token(gateway, queues=[gateway.new_queue()])
    extra = [gateway.ca.cert_pem] if bundle == "real_ca_copied_in" else []
    state = tmp_path / "state"
    with ImpostorGateway(extra) as impostor:
        result = edge_agent_cli(
            "register", "--url", impostor.url, "--token-file", "-", "--state-dir", str(state), stdin=str(token)
        )
        received = impostor.everything_received()
        methods = [(m, p) for m, p, _, _ in impostor.requests]
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    message = result.stderr.lower()
    if bundle == "impostor_ca_only":
        assert "pin" in message
    else:
        assert "certificate" in message
    assert ("GET", TRUST_BUNDLE_PATH) in methods, "the agent never reached the impostor: the test proves nothing"
    assert token.secret.encode() not in received
    assert token.token_id.encode() not in received
    assert all(method == "GET" and path == TRUST_BUNDLE_PATH for method, path in methods), methods
    assert token.secret not in result.stdout + result.stderr
    assert not (state / "agent.key").exists() and not (state / "identity.json").exists()
    assert token_row(gateway, token.token_id)["uses"] == 0
