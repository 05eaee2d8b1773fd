"""Attacks on the identity lifecycle: renewing with the old key or as a revoked agent, a stolen
certificate used after revocation, unregistration or a CA retirement, and a revoked agent holding
an open long-poll.

Each test asserts the refusal and that nothing was issued or moved: the agent row (serial, key,
expiry), the jobs, and what a held poll got.
"""

from __future__ import annotations

import base64
import ssl
import time
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from secsupport import (
    EFFECT_WITHIN_SECONDS,
    HeldPoll,
    agent_row,
    airflow_cli,
    enroll,
    job_row,
    lease_job,
)
from sqlalchemy import update

from edge_agent.identity.pki_utils import generate_key, make_csr
from edge_agent.protocol import (
    LEASE_PATH,
    RENEW_PATH,
    SELF_PATH,
    WHOAMI_PATH,
    AgentIdentity,
    LeaseResponse,
    job_state_path,
)
from executor_plugin.models import AgentStatus, JobStatus, agent_table
from executor_plugin.pki import CertificateAuthority, agent_id_from_cert


def _revoke_in_db(gw: Any, agent_id: str) -> None:
    with gw.home.session() as s:
        s.execute(update(agent_table).where(agent_table.c.id == agent_id).values(state=AgentStatus.REVOKED))
        s.commit()


# ---------------------------------------------------------------------------------------------------
# Renewal
# ---------------------------------------------------------------------------------------------------


def test_renewal_with_the_current_key_is_refused(gateway, tmp_path):
    # A rotation that kept the key would keep a stolen key valid across renewals.
    agent = enroll(gateway, tmp_path)
    before = agent_row(gateway, agent.agent_id)
    with gateway.client(agent) as c:
        r = c.post(RENEW_PATH, json={"csr_pem": make_csr(agent.key, "x")})
    assert r.status_code == 400
    assert "new key" in r.json()["detail"]
    assert "cert_pem" not in r.text
    assert agent_row(gateway, agent.agent_id) == before


def test_revoked_agent_cannot_renew(gateway, tmp_path):
    agent = enroll(gateway, tmp_path)
    _revoke_in_db(gateway, agent.agent_id)
    before = agent_row(gateway, agent.agent_id)
    with gateway.client(agent) as c:
        r = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x")})
    assert r.status_code == 403
    assert "cert_pem" not in r.text
    assert agent_row(gateway, agent.agent_id) == before


def test_renewal_csr_with_a_swapped_public_key_is_refused(gateway, tmp_path):
    # Proof of possession: a CSR naming a key its signature was not made with gets no certificate.
    agent = enroll(gateway, tmp_path)
    signer, claimed = generate_key(), generate_key()
    csr = x509.load_pem_x509_csr(make_csr(signer, "x").encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    old_spki, new_spki = (
        k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in (signer, claimed)
    )
    at = bytes(der).index(old_spki)
    der[at : at + len(old_spki)] = new_spki
    body = base64.encodebytes(bytes(der)).decode()
    forged = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    before = agent_row(gateway, agent.agent_id)
    with gateway.client(agent) as c:
        r = c.post(RENEW_PATH, json={"csr_pem": forged})
    assert r.status_code == 400
    assert agent_row(gateway, agent.agent_id) == before


def test_renewal_cannot_change_identity_or_scope(gateway, tmp_path):
    agent = enroll(gateway, tmp_path, region="it-1")
    before = agent_row(gateway, agent.agent_id)
    with gateway.client(agent) as c:
        widened = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x"), "queues": ["admin"]})
        assert widened.status_code == 422
        assert agent_row(gateway, agent.agent_id) == before
        renewed = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "ag_other")})
    assert renewed.status_code == 200, renewed.text
    ident = AgentIdentity.model_validate(renewed.json())
    # Whatever the CSR asked for, the certificate names the caller, and the scope is the token's.
    cert = x509.load_pem_x509_certificate(ident.cert_pem.encode())
    assert agent_id_from_cert(cert, trust_domain=gateway.trust_domain) == agent.agent_id
    assert (ident.agent_id, ident.queues, ident.region) == (agent.agent_id, agent.identity.queues, "it-1")
    after = agent_row(gateway, agent.agent_id)
    assert [after[k] for k in ("queues", "region", "token_id")] == [before[k] for k in ("queues", "region", "token_id")]


# ---------------------------------------------------------------------------------------------------
# Revocation and unregistration
# ---------------------------------------------------------------------------------------------------


def test_revoke_command_ends_an_open_long_poll_without_a_lease(gateway, tmp_path):
    queue = gateway.new_queue()
    agent = enroll(gateway, tmp_path, queues=[queue])
    held_job = gateway.enqueue(queue)
    held = lease_job(gateway, agent, held_job)
    with gateway.client(agent, timeout=120) as c:
        poll = HeldPoll(c, wait_seconds=45)
        assert poll.sent.wait(60)
        revoked = airflow_cli(gateway, "revoke", agent.agent_id, "--json")
        assert revoked.returncode == 0, revoked.stderr
        # Work arriving for the revoked agent's queue must not reach the poll it still holds.
        new_job = gateway.enqueue(queue, task_id="after_revoke")
        poll.thread.join(EFFECT_WITHIN_SECONDS)
        ended = not poll.thread.is_alive()
        if not ended:  # let the request finish before failing, so the process stays tidy
            poll.thread.join(120)
    assert poll.error is None, poll.error
    assert poll.response is not None
    got = poll.response.status_code == 200 and LeaseResponse.model_validate(poll.response.json()).lease is not None
    assert not got, "a revoked agent was handed a job through the long-poll it held"
    assert ended, f"the open long-poll did not end within {EFFECT_WITHIN_SECONDS} s of the revocation"
    assert poll.response.status_code == 403
    assert job_row(gateway, new_job)["state"] == JobStatus.QUEUED
    # The job it had leased but not started went back to the queue under a new fencing id.
    back = job_row(gateway, held_job)
    assert (back["state"], back["agent_id"]) == (JobStatus.QUEUED, None) and back["fencing"] > held.fencing
    with gateway.client(agent) as c:
        late = c.post(job_state_path(held_job), json={"fencing": held.fencing, "state": "running"})
    assert late.status_code == 403
    assert job_row(gateway, held_job) == back


def test_unregistered_agents_certificate_is_refused_and_its_jobs_go_back(gateway, tmp_path):
    agent = enroll(gateway, tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    held = lease_job(gateway, agent, job_id)
    with gateway.client(agent) as c:
        gone = c.delete(SELF_PATH)
    assert gone.status_code == 204
    assert agent_row(gateway, agent.agent_id)["state"] == AgentStatus.REVOKED
    back = job_row(gateway, job_id)
    assert (back["state"], back["agent_id"]) == (JobStatus.QUEUED, None) and back["fencing"] > held.fencing
    # A copy of the key and certificate (say, a backup) is worth nothing now.
    other_job = gateway.enqueue(agent.identity.queues[0], task_id="after_unregister")
    other_before = job_row(gateway, other_job)
    with gateway.client(agent) as c:
        refused = [
            c.get(WHOAMI_PATH),
            c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 0}),
            c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x")}),
            c.post(job_state_path(job_id), json={"fencing": held.fencing, "state": "running"}),
            c.delete(SELF_PATH),
        ]
    assert [r.status_code for r in refused] == [403] * 5
    assert job_row(gateway, job_id) == back
    assert job_row(gateway, other_job) == other_before


# ---------------------------------------------------------------------------------------------------
# CA rotation
# ---------------------------------------------------------------------------------------------------


def _client_trusting(gw: Any, ca_pems: list[str], agent: Any) -> httpx.Client:
    ctx = ssl.create_default_context(cadata="\n".join(ca_pems))
    ctx.load_cert_chain(str(agent.cert_file), str(agent.key_file))
    return httpx.Client(base_url=gw.url, verify=ctx, timeout=30)


def test_certificate_of_a_retired_ca_is_refused_within_seconds(start_gateway, tmp_path):
    gw = start_gateway()
    old_ca_pem = gw.ca.cert_pem
    agent = enroll(gw, tmp_path)
    job_id = gw.enqueue(agent.identity.queues[0])
    new_ca, _ = CertificateAuthority.rotate(gw.home.path / "ca")
    trust = [old_ca_pem, new_ca.cert_pem]
    with _client_trusting(gw, trust, agent) as c:
        # Control: during the rotation both CAs are trusted, so the old certificate still works.
        assert c.get(WHOAMI_PATH).status_code == 200
    new_ca.retire_old()
    before = job_row(gw, job_id)
    deadline = time.monotonic() + EFFECT_WITHIN_SECONDS
    status = None
    while time.monotonic() < deadline:
        with _client_trusting(gw, trust, agent) as c:
            try:
                status = c.get(WHOAMI_PATH).status_code
            except httpx.TransportError:
                status = "handshake refused"
        if status != 200:
            break
        time.sleep(0.5)  # the gateway looks at the CA directory every couple of seconds
    assert status in (401, "handshake refused"), (
        f"old-CA certificate still accepted {EFFECT_WITHIN_SECONDS} s after retirement"
    )
    with _client_trusting(gw, trust, agent) as c:
        try:
            r = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 0})
            assert r.status_code == 401
        except httpx.TransportError:
            pass
    assert job_row(gw, job_id) == before
