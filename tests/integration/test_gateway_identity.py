"""Gateway identity over real TLS: trust bundle, registration, whoami, certificate checks, and the
Execution API mount behind the same client-certificate check."""

from __future__ import annotations

import ssl
from datetime import timedelta

import httpx
import pytest
import trustme
from sqlalchemy import update

from edge_agent.identity.pki_utils import cert_not_after, generate_key, load_cert, make_csr, spki_pin
from edge_agent.protocol import REGISTER_PATH, TRUST_BUNDLE_PATH, WHOAMI_PATH, RegistrationToken, TrustBundle, WhoAmI
from executor_plugin.models import AgentStatus, agent_table
from executor_plugin.pki import CertificateAuthority, agent_id_from_cert


def _register_body(token, key=None, name="n"):
    return {"token": str(token), "csr_pem": make_csr(key or generate_key(), "x"), "name": name, "version": "it"}


def test_trust_bundle_needs_no_certificate(gateway):
    with gateway.client() as c:
        r = c.get(TRUST_BUNDLE_PATH)
    assert r.status_code == 200
    bundle = TrustBundle.model_validate(r.json())
    assert bundle.trust_domain == gateway.trust_domain
    assert spki_pin(bundle.ca_pems[0]) == gateway.ca.pin


def test_server_certificate_is_issued_by_our_ca_for_loopback(gateway):
    # The client context trusts only our CA and checks the host name: a wrong cert fails here.
    with gateway.client() as c:
        assert c.get(TRUST_BUNDLE_PATH).status_code == 200
    key_file = gateway.home.path / "ca" / "gateway" / "server.key"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_whoami_without_certificate_is_401(gateway):
    with gateway.client() as c:
        r = c.get(WHOAMI_PATH)
    assert r.status_code == 401
    assert r.json() == {"detail": "client certificate required"}


def test_certificate_from_another_ca_fails_the_handshake(gateway, tmp_path):
    foreign = trustme.CA()
    leaf = foreign.issue_cert("agent.example.test")
    ctx = ssl.create_default_context(cadata=gateway.ca.cert_pem)
    leaf.configure_cert(ctx)
    with httpx.Client(base_url=gateway.url, verify=ctx, timeout=30) as c, pytest.raises(httpx.TransportError):
        # TLS 1.3 reports the server's rejection after the client finished its side of the
        # handshake: it surfaces as a read/protocol error rather than an ssl error.
        c.get(TRUST_BUNDLE_PATH)


def test_register_then_whoami(gateway, tmp_path):
    queue = gateway.new_queue()
    token = gateway.mint_token(queues=[queue], name="from-token")
    agent = gateway.register(tmp_path, token=token, name=None)
    ident = agent.identity
    assert ident.agent_id.startswith("ag_") and len(ident.agent_id) == 15
    assert ident.name == "from-token"  # request gave no name: the token's
    assert ident.queues == [queue] and ident.region == "it-1"
    assert ident.executor == gateway.executor
    assert spki_pin(ident.ca_pems[0]) == gateway.ca.pin
    cert = load_cert(ident.cert_pem)
    assert agent_id_from_cert(cert, trust_domain=gateway.trust_domain) == ident.agent_id
    assert cert_not_after(ident.cert_pem) == ident.cert_not_after
    with gateway.client(agent) as c:
        r = c.get(WHOAMI_PATH)
    assert r.status_code == 200, r.text
    who = WhoAmI.model_validate(r.json())
    assert (who.agent_id, who.state, who.queues) == (ident.agent_id, AgentStatus.ACTIVE, [queue])
    assert who.cert_not_after == ident.cert_not_after


def test_token_reuse_other_key_refused_same_key_idempotent(gateway, tmp_path):
    token = gateway.mint_token(queues=[gateway.new_queue()])
    key = generate_key()
    first = gateway.register(tmp_path, token=token, key=key, name="first")
    with gateway.client() as c:
        other = c.post(REGISTER_PATH, json=_register_body(token))
        again = c.post(REGISTER_PATH, json=_register_body(token, key=key))
    assert other.status_code == 401
    assert "already used" in other.json()["detail"]
    assert again.status_code == 200, again.text
    assert again.json()["agent_id"] == first.agent_id
    assert again.json()["name"] == "first"


@pytest.mark.parametrize(
    ("token_kind", "status", "detail"),
    [
        ("garbage", 400, "not an edge-agent registration token"),
        ("other_ca", 401, "another CA"),
        ("unknown", 401, "unknown"),
        ("expired", 401, "expired"),
    ],
)
def test_register_refuses_bad_tokens(gateway, token_kind, status, detail):
    if token_kind == "garbage":
        token = "eat1_not_a_token"
    elif token_kind == "other_ca":
        token = str(RegistrationToken.mint(b"\x01" * 32))
    elif token_kind == "unknown":
        token = str(RegistrationToken.mint(gateway.ca.pin))
    else:
        token = str(gateway.mint_token(queues=[gateway.new_queue()], ttl=timedelta(seconds=-1)))
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json={"token": token, "csr_pem": make_csr(generate_key(), "x"), "version": "it"})
    assert r.status_code == status
    assert detail in r.json()["detail"]


def test_register_refuses_bad_csr_without_spending_the_token(gateway, tmp_path):
    token = gateway.mint_token(queues=[gateway.new_queue()])
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json={"token": str(token), "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "version": "it"})
    assert r.status_code == 400
    assert gateway.register(tmp_path, token=token).agent_id.startswith("ag_")


@pytest.mark.parametrize(
    "body",
    [
        {"token": "x"},
        {"token": "x", "csr_pem": "y", "version": "1", "queues": ["admin"]},  # unknown field
        {"token": 5, "csr_pem": None, "version": "1"},
        [],
    ],
)
def test_malformed_register_bodies_are_4xx(gateway, body):
    with gateway.client() as c:
        r = c.post(REGISTER_PATH, json=body)
        raw = c.post(REGISTER_PATH, content=b"\xff\x00not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert 400 <= raw.status_code < 500


def test_certificate_of_another_trust_domain_is_401(gateway, tmp_path):
    key = generate_key()
    pem, _, _ = gateway.ca.sign_agent_csr(
        make_csr(key, "x"), agent_id="ag_aaaaaaaaaaaa", trust_domain="elsewhere.test", ttl=timedelta(hours=1)
    )
    agent = _files(tmp_path, key, pem)
    with _client_with(gateway, agent) as c:
        r = c.get(WHOAMI_PATH)
    assert r.status_code == 401


def test_certificate_for_unknown_agent_is_401(gateway, tmp_path):
    key = generate_key()
    pem, _, _ = gateway.ca.sign_agent_csr(
        make_csr(key, "x"), agent_id="ag_bbbbbbbbbbbb", trust_domain=gateway.trust_domain, ttl=timedelta(hours=1)
    )
    with _client_with(gateway, _files(tmp_path, key, pem)) as c:
        r = c.get(WHOAMI_PATH)
    assert r.status_code == 401
    assert "unknown agent" in r.json()["detail"]


def test_revoked_agent_is_403_everywhere(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.home.session() as s:
        s.execute(update(agent_table).where(agent_table.c.id == agent.agent_id).values(state=AgentStatus.REVOKED))
        s.commit()
    with gateway.client(agent) as c:
        assert c.get(WHOAMI_PATH).status_code == 403
        assert c.get("/execution/health").status_code == 403


def test_execution_api_requires_agent_certificate(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.client() as anonymous:
        r = anonymous.get("/execution/health")
    assert r.status_code == 401
    assert r.json() == {"detail": "client certificate required"}
    with gateway.client(agent) as c:
        health = c.get("/execution/health")
        # /health/ping answers from the services registered by the Execution API's own lifespan:
        # it proves the mounted app's lifespan ran inside the gateway.
        ping = c.get("/execution/health/ping")
        # An authenticated Execution API route reaches Airflow's JWT check (not ours) with our cert.
        no_jwt = c.get("/execution/variables/some_key")
    assert health.status_code == 200 and health.json() == {"status": "healthy"}
    assert ping.status_code == 200, ping.text
    assert any("JWTValidator" in name for name in ping.json()["ok"])
    assert no_jwt.status_code in (401, 403)


def _files(tmp_path, key, pem):
    from cryptography.hazmat.primitives import serialization

    cert_file, key_file = tmp_path / "c.pem", tmp_path / "c.key"
    cert_file.write_text(pem)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def _client_with(gateway, files):
    ctx = ssl.create_default_context(cadata=gateway.ca.cert_pem)
    ctx.load_cert_chain(str(files[0]), str(files[1]))
    return httpx.Client(base_url=gateway.url, verify=ctx, timeout=30)


def test_server_certificate_cannot_be_used_as_client_certificate(gateway, tmp_path):
    # Issued by our CA but with serverAuth only: OpenSSL's client-purpose check refuses it.
    cert_pem, key_pem = gateway.ca.issue_server_cert(["127.0.0.1"], timedelta(hours=1))
    (tmp_path / "s.pem").write_text(cert_pem)
    (tmp_path / "s.key").write_text(key_pem)
    with _client_with(gateway, (tmp_path / "s.pem", tmp_path / "s.key")) as c, pytest.raises(httpx.TransportError):
        c.get(TRUST_BUNDLE_PATH)


def test_ca_is_reused_not_recreated(gateway):
    again, created = CertificateAuthority.init(gateway.home.path / "ca")
    assert not created and again.pin == gateway.ca.pin


def test_execution_api_is_warm_before_the_first_agent_arrives(gateway):
    # The first request to Airflow's Execution API initialises it (seconds); the gateway pays that
    # at start, so the first task's /run does not race the Task SDK's timeout.
    assert "execution API warmed in" in "".join(gateway.output)  # the whole log: it is the first lines
