"""An agent's identity lifecycle through the real gateway: certificate renewal with a new key,
self-removal, revocation that ends an open long-poll, drain and resume."""

from __future__ import annotations

import concurrent.futures
import time

from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from edge_agent.identity.pki_utils import generate_key, load_cert, make_csr, pubkey_fingerprint, spki_pin
from edge_agent.protocol import (
    HEARTBEAT_PATH,
    LEASE_PATH,
    MAX_LEASE_WAIT_SECONDS,
    RENEW_PATH,
    SELF_PATH,
    WHOAMI_PATH,
    AgentIdentity,
    HeartbeatResponse,
    LeaseResponse,
)
from executor_plugin import store
from executor_plugin.models import AgentStatus, JobStatus, job_table
from executor_plugin.pki import agent_id_from_cert


def _write_identity(folder, identity: AgentIdentity, key):
    folder.mkdir(mode=0o700)
    cert_file, key_file = folder / "agent.pem", folder / "agent.key"
    cert_file.write_text(identity.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_renew_issues_a_working_certificate_for_a_new_key(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    new_key = generate_key()
    with gateway.client(agent) as c:
        same_key = c.post(RENEW_PATH, json={"csr_pem": make_csr(agent.key, "x")})
        r = c.post(RENEW_PATH, json={"csr_pem": make_csr(new_key, "x")})
        retried = c.post(RENEW_PATH, json={"csr_pem": make_csr(new_key, "x")})  # a lost reply
    assert same_key.status_code == 400 and "new key" in same_key.json()["detail"]
    assert r.status_code == 200, r.text
    assert retried.status_code == 200
    renewed = AgentIdentity.model_validate(r.json())
    old = agent.identity
    assert (renewed.agent_id, renewed.queues, renewed.region) == (old.agent_id, old.queues, old.region)
    cert = load_cert(renewed.cert_pem)
    assert agent_id_from_cert(cert, trust_domain=gateway.trust_domain) == old.agent_id
    assert cert.serial_number != load_cert(old.cert_pem).serial_number
    assert pubkey_fingerprint(cert.public_key()) == pubkey_fingerprint(new_key.public_key())
    assert spki_pin(renewed.ca_pems[0]) == gateway.ca.pin

    cert_file, key_file = _write_identity(tmp_path / "renewed", renewed, new_key)
    agent.cert_file, agent.key_file = cert_file, key_file
    with gateway.client(agent) as c:
        who = c.get(WHOAMI_PATH)
    assert who.status_code == 200 and who.json()["agent_id"] == old.agent_id
    with gateway.home.session() as s:
        row = store.get_agent(s, old.agent_id)
    last = load_cert(AgentIdentity.model_validate(retried.json()).cert_pem)
    assert row.cert_serial == format(last.serial_number, "x")
    assert row.cert_issuer == gateway.ca.pin.hex()
    assert row.pubkey_fp == pubkey_fingerprint(new_key.public_key())


def test_self_removal_revokes_and_requeues_leased_jobs(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    with gateway.client(agent) as c:
        lease = LeaseResponse.model_validate(c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 5}).json()).lease
        assert lease is not None and lease.job_id == job_id
        gone = c.delete(SELF_PATH)
        after = c.get(WHOAMI_PATH)
        renew = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x")})
    assert gone.status_code == 204
    assert after.status_code == 403 and renew.status_code == 403
    with gateway.home.session() as s:
        row = s.execute(select(job_table).where(job_table.c.id == job_id)).one()
        assert store.get_agent(s, agent.agent_id).state == AgentStatus.REVOKED
    assert (row.state, row.agent_id) == (JobStatus.QUEUED, None)


def test_revoke_ends_an_open_long_poll_with_403(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.client(agent) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert c.get(WHOAMI_PATH).status_code == 200  # connection up before the poll starts
        started = time.monotonic()
        held = pool.submit(c.post, LEASE_PATH, json={"free_slots": 1, "wait_seconds": MAX_LEASE_WAIT_SECONDS})
        try:
            held.result(timeout=1.0)
            raise AssertionError("the poll ended before the revocation")
        except concurrent.futures.TimeoutError:
            pass
        with gateway.home.session() as s:
            store.revoke_agent(s, agent.agent_id)
            s.commit()
        r = held.result(timeout=MAX_LEASE_WAIT_SECONDS + 30)
        ended_after = time.monotonic() - started
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    # Bound, not duration: the poll did not simply run to its end.
    assert ended_after < MAX_LEASE_WAIT_SECONDS - 10


def test_drain_and_resume_through_heartbeat_and_lease(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    job_id = gateway.enqueue(agent.identity.queues[0])
    heartbeat = {"free_slots": 1, "total_slots": 1, "version": "it"}
    with gateway.home.session() as s:
        store.drain_agent(s, agent.agent_id)
        s.commit()
    with gateway.client(agent) as c:
        hb = HeartbeatResponse.model_validate(c.post(HEARTBEAT_PATH, json=heartbeat).json())
        held = c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 30})
        assert hb.drain is True and held.json() == {"lease": None}
        with gateway.home.session() as s:
            store.resume_agent(s, agent.agent_id)
            s.commit()
        hb = HeartbeatResponse.model_validate(c.post(HEARTBEAT_PATH, json=heartbeat).json())
        lease = LeaseResponse.model_validate(c.post(LEASE_PATH, json={"free_slots": 1, "wait_seconds": 5}).json()).lease
    assert hb.drain is False
    assert lease is not None and lease.job_id == job_id


def test_unknown_or_revoked_agents_cannot_renew(gateway, tmp_path):
    agent = gateway.register(tmp_path)
    with gateway.home.session() as s:
        store.revoke_agent(s, agent.agent_id)
        s.commit()
    with gateway.client(agent) as c:
        r = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x")})
    assert r.status_code == 403
    with gateway.client() as c:
        anonymous = c.post(RENEW_PATH, json={"csr_pem": make_csr(generate_key(), "x")})
    assert anonymous.status_code == 401
