"""Outbound networking end to end: the real agent CLI and ``edge_agent.doctor`` through a loopback CONNECT
proxy (Basic authentication) to the real gateway, and a TLS-inspecting proxy being detected.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from connect_proxy import ConnectProxy
from pkg_helpers import clean_env

from edge_agent.doctor import diagnose
from edge_agent.identity.keystore import Keystore

EDGE_AGENT = shutil.which("edge-agent", path=str(Path(sys.executable).parent))


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    p = ConnectProxy(username="agent", password="s3cret:pw").start()
    yield p
    p.stop()


@pytest.fixture
def inspecting_proxy() -> Iterator[ConnectProxy]:
    ca = trustme.CA(organization_name="Corp Inspection CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    p = ConnectProxy(intercept=ctx).start()
    yield p
    p.stop()


def cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    assert EDGE_AGENT, "edge-agent console script not found next to this python"
    return subprocess.run([EDGE_AGENT, *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env=clean_env(**env))


def proxy_env(url: str) -> dict[str, str]:
    # Both spellings: a lower-case variable wins in httpx (urllib) and a stray one must not bypass us.
    return {"HTTPS_PROXY": url, "https_proxy": url}


def test_register_status_and_doctor_go_through_the_proxy(gateway, proxy, tmp_path) -> None:
    state = tmp_path / "state"
    token = gateway.mint_token(queues=[gateway.new_queue()])
    env = proxy_env(proxy.url())
    reg = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(state), stdin=str(token), **env)
    assert reg.returncode == 0, reg.stderr
    target = f"127.0.0.1:{gateway.port}"
    assert proxy.tunnels and set(proxy.tunnels) == {target}
    assert "s3cret" not in reg.stdout + reg.stderr

    before = len(proxy.tunnels)
    status = cli("status", "--state-dir", str(state), "--json", **env)
    assert status.returncode == 0, status.stderr
    assert len(proxy.tunnels) > before, "status did not use the proxy"

    identity = Keystore(state, "file").load()
    report = diagnose(identity.url, ca_pems=identity.ca_pems, identity=identity, env=env)
    assert report.ok, report.to_dict()
    assert [c.name for c in report.checks] == ["proxy", "dns", "tcp", "connect", "tls", "interception", "ca_pin",
                                               "clock", "identity"]
    assert "through http://agent:***@127.0.0.1" in report.get("proxy").detail  # type: ignore[union-attr]
    assert "s3cret" not in str(report.to_dict())
    assert all(c.status == "ok" for c in report.checks), report.to_dict()


def test_no_proxy_bypasses_it(gateway, proxy, tmp_path) -> None:
    token = gateway.mint_token(queues=[gateway.new_queue()])
    env = {**proxy_env(proxy.url()), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    reg = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"),
              stdin=str(token), **env)
    assert reg.returncode == 0, reg.stderr
    assert proxy.tunnels == []
    report = diagnose(gateway.url, pins=[token.ca_pin], env=env)
    assert report.get("proxy").detail.startswith("direct")  # type: ignore[union-attr]
    assert report.get("connect") is None and report.ok, report.to_dict()


def test_wrong_proxy_password_is_one_clear_line_and_the_doctor_names_the_fix(gateway, proxy, tmp_path) -> None:
    token = gateway.mint_token(queues=[gateway.new_queue()])
    env = proxy_env(proxy.url(password="wrong"))
    reg = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"),
              stdin=str(token), **env)
    assert reg.returncode != 0
    lines = [line for line in reg.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "407" in lines[0], reg.stderr
    assert 407 in proxy.refused

    report = diagnose(gateway.url, pins=[token.ca_pin], env=env)
    connect = report.get("connect")
    assert connect is not None and connect.status == "fail" and "authentication" in connect.detail
    assert connect.fix and "HTTPS_PROXY" in connect.fix
    assert report.get("tls").status == "skip" and not report.ok  # type: ignore[union-attr]


def test_tls_inspecting_proxy_is_detected_and_the_token_never_leaves(gateway, inspecting_proxy, tmp_path) -> None:
    token = gateway.mint_token(queues=[gateway.new_queue()])
    env = proxy_env(inspecting_proxy.url())
    pin = token.ca_pin

    # Before registration (a pin, no CA bundle yet).
    report = diagnose(gateway.url, pins=[pin], env=env)
    inter = report.get("interception")
    assert inter is not None and inter.status == "fail", report.to_dict()
    assert "Corp Inspection CA" in inter.detail and inter.fix and "exempt" in inter.fix
    assert report.get("ca_pin").status == "ok"  # type: ignore[union-attr]  # the bundle itself is genuine

    # Registration through it fails closed: the gateway's certificate does not verify, so the token
    # is never sent (it stays usable for a retry without the proxy).
    reg = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"),
              stdin=str(token), **env)
    assert reg.returncode != 0, reg.stdout
    ok = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s2"),
             stdin=str(token))
    assert ok.returncode == 0, ok.stderr

    # With an identity (the agent's CA bundle), the same proxy is named as the culprit.
    identity = Keystore(tmp_path / "s2", "file").load()
    report = diagnose(identity.url, ca_pems=identity.ca_pems, identity=identity, env=env)
    assert report.get("tls").status == "fail"  # type: ignore[union-attr]
    assert report.get("interception").status == "fail"  # type: ignore[union-attr]
    assert "Corp Inspection CA" in report.get("interception").detail  # type: ignore[union-attr]


def test_ssl_cert_file_does_not_widen_the_agents_trust(gateway, tmp_path) -> None:
    # A custom CA bundle in the environment (SSL_CERT_FILE, REQUESTS_CA_BUNDLE) is for other tools:
    # the agent trusts only the CA bundle pinned at registration, so such a variable can neither
    # break the gateway connection nor let a proxy's CA in.
    other = trustme.CA()
    bundle = tmp_path / "corp-ca.pem"
    other.cert_pem.write_to_path(str(bundle))
    token = gateway.mint_token(queues=[gateway.new_queue()])
    env = {"SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle), "SSL_CERT_DIR": str(tmp_path)}
    reg = cli("register", "--url", gateway.url, "--token-file", "-", "--state-dir", str(tmp_path / "s"),
              stdin=str(token), **env)
    assert reg.returncode == 0, reg.stderr
    status = cli("status", "--state-dir", str(tmp_path / "s"), **env)
    assert status.returncode == 0, status.stderr
    assert os.environ.get("SSL_CERT_FILE") != str(bundle)
