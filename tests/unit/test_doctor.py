"""``edge_agent.doctor`` against real loopback servers: a TLS server serving a trust bundle, a closed
port, a port that does not speak TLS. The proxy paths and the real gateway are in
tests/packaging/test_proxy.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from edge_agent import doctor
from edge_agent.doctor import Check, Report, diagnose, format_report, proxy_for
from edge_agent.identity.pki_utils import spki_pin


class _Bundle(BaseHTTPRequestHandler):
    bundle: list[str] = []
    date_offset = timedelta(0)

    def do_GET(self) -> None:
        if self.path != "/agents/v1/trust-bundle":
            self.send_error(404)
            return
        body = json.dumps({"ca_pems": self.bundle, "trust_domain": "t"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def date_time_string(self, timestamp=None) -> str:  # type: ignore[override]
        return format_datetime(datetime.now(timezone.utc) + self.date_offset, usegmt=True)

    def log_message(self, *args) -> None:
        pass


class Server:
    def __init__(self, ca: trustme.CA, *bundle_cas: trustme.CA, date_offset: timedelta = timedelta(0)) -> None:
        bundle = [c.cert_pem.bytes().decode() for c in bundle_cas]
        handler = type("H", (_Bundle,), {"bundle": bundle, "date_offset": date_offset})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(ca) -> Iterator[Server]:
    s = Server(ca, ca)
    yield s
    s.stop()


def pem(ca: trustme.CA) -> str:
    return ca.cert_pem.bytes().decode()


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_all_good_with_a_ca_bundle(server, ca) -> None:
    report = diagnose(server.url, ca_pems=[pem(ca)], env={})
    assert statuses(report) == {"proxy": "ok", "dns": "ok", "tcp": "ok", "tls": "ok", "interception": "ok",
                                "ca_pin": "ok", "clock": "ok"}, report.to_dict()
    assert report.ok and json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_all_good_with_only_a_pin(server, ca) -> None:
    report = diagnose(server.url, pins=[spki_pin(pem(ca))], env={})
    assert report.ok, report.to_dict()
    assert "not verified yet" in report.get("tls").detail  # type: ignore[union-attr]


def test_wrong_pin_fails_with_a_fix(server) -> None:
    report = diagnose(server.url, pins=[b"\0" * 32], env={})
    pin = report.get("ca_pin")
    assert pin is not None and pin.status == "fail" and pin.fix and "URL" in pin.fix


def test_rotated_ca_is_a_warning_and_a_replaced_ca_a_failure(ca) -> None:
    new = trustme.CA()
    s = Server(ca, ca, new)  # rotation: both CAs served
    try:
        pin = diagnose(s.url, ca_pems=[pem(ca)], env={}).get("ca_pin")
        assert pin is not None and pin.status == "warn" and "rotation" in pin.detail
    finally:
        s.stop()
    # The server's certificate is still from the old CA, and it serves only the new CA.
    s = Server(ca, new)
    try:
        report = diagnose(s.url, ca_pems=[pem(ca)], env={})
        assert report.get("ca_pin").status == "fail"  # type: ignore[union-attr]
        assert "re-register" in (report.get("ca_pin").fix or "")  # type: ignore[union-attr]
    finally:
        s.stop()


def test_foreign_certificate_is_reported_as_interception(ca) -> None:
    corp = trustme.CA(organization_name="Corp Inspection CA")
    s = Server(corp, ca)  # presents a certificate from another CA, serves our bundle
    try:
        report = diagnose(s.url, ca_pems=[pem(ca)], env={})
        assert report.get("tls").status == "fail"  # type: ignore[union-attr]
        inter = report.get("interception")
        assert inter is not None and inter.status == "fail" and "Corp Inspection CA" in inter.detail
        assert statuses(report)["ca_pin"] == "skip"
        text = "\n".join(format_report(report))
        assert "FAIL interception" in text and "fix: ask your network team" in text
    finally:
        s.stop()


@pytest.mark.parametrize("offset, expected", [(timedelta(minutes=10), "fail"), (timedelta(seconds=-90), "warn")])
def test_clock_skew(ca, offset, expected) -> None:
    s = Server(ca, ca, date_offset=offset)
    try:
        clock = diagnose(s.url, ca_pems=[pem(ca)], env={}).get("clock")
        assert clock is not None and clock.status == expected, clock
        assert ("behind" if offset > timedelta(0) else "ahead") in clock.detail
        assert clock.fix and "timedatectl" in clock.fix
    finally:
        s.stop()


def test_closed_port() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    report = diagnose(f"https://127.0.0.1:{port}", env={})
    tcp = report.get("tcp")
    assert tcp is not None and tcp.status == "fail" and tcp.fix and "firewall" in tcp.fix
    assert statuses(report)["tls"] == "skip" and not report.ok


def test_port_that_does_not_speak_tls() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        tls = diagnose(f"https://127.0.0.1:{port}", env={}).get("tls")
        assert tls is not None and tls.status == "fail" and "wrong port" in (tls.fix or "")
    finally:
        t.join(30)
        srv.close()


def test_dns_failure_names_the_fix(monkeypatch) -> None:
    # A real failing lookup would ask this machine's resolver (off loopback): simulate the resolver.
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(doctor.socket, "getaddrinfo", no_such_host)
    report = diagnose("https://gateway.example.internal:8443", env={})
    dns = report.get("dns")
    assert dns is not None and dns.status == "fail" and "gateway.example.internal" in dns.detail
    assert dns.fix and "HTTPS_PROXY" in dns.fix


@pytest.mark.parametrize("env, url, expected", [
    ({}, "https://gw:8443", None),
    ({"HTTPS_PROXY": "http://p:3128"}, "https://gw:8443", ("p", 3128, None)),
    ({"HTTPS_PROXY": "p:3128"}, "https://gw:8443", ("p", 3128, None)),
    ({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, "https://gw", ("low", 1, None)),
    ({"ALL_PROXY": "http://all:3"}, "https://gw", ("all", 3, None)),
    ({"HTTP_PROXY": "http://only-http:4"}, "https://gw", None),
    ({"HTTPS_PROXY": "http://u%40x:p%3Aw@p:5"}, "https://gw", ("p", 5, "u@x")),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": "gw"}, "https://gw:8443", None),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": "example.com"}, "https://agents.example.com", None),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": ".example.com"}, "https://example.com", ("p", 6, None)),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": "other.com, 127.0.0.1"}, "https://127.0.0.1:9", None),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": "*"}, "https://gw", None),
    ({"HTTPS_PROXY": "http://p:6", "NO_PROXY": "localhost"}, "https://localhost:1", None),
])
def test_proxy_selection_follows_httpx(env, url, expected) -> None:
    proxy = proxy_for(url, env)
    got = None if proxy is None else (proxy.host, proxy.port, proxy.username)
    assert got == expected


def test_proxy_display_hides_the_password() -> None:
    proxy = proxy_for("https://gw", {"HTTPS_PROXY": "http://user:hunter2@p:3128"})
    assert proxy is not None and proxy.password == "hunter2"
    assert proxy.display == "http://user:***@p:3128" and proxy.source == "HTTPS_PROXY"


def test_report_ok_ignores_warnings_and_skips() -> None:
    r = Report("https://gw", (Check("a", "ok", ""), Check("b", "warn", "", "fix"), Check("c", "skip", "")))
    assert r.ok
    assert not Report("https://gw", (Check("a", "fail", "", "fix"),)).ok
