"""The register flow against a small real TLS server that records every request it receives.

The point of the CA pin is that the token's secret never leaves the machine when the gateway is not
the one the token names: these tests look at what the server actually received.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import InvalidURL, PinMismatch, RegistrationRefused, ServerCertInvalid, TokenInvalid
from edge_agent.identity.enroll import register
from edge_agent.identity.keystore import Keystore
from edge_agent.identity.pki_utils import spki_pin
from edge_agent.protocol import REGISTER_PATH, TRUST_BUNDLE_PATH, RegistrationToken

# -- a tiny CA (the test must sign CSRs, which trustme does not expose) ---------------------------


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "CA":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, public_key, *, ip: str | None = None, dns: str | None = None, client: bool = False) -> str:
        now = datetime.now(timezone.utc)
        names: list[x509.GeneralName] = []
        if ip:
            names.append(x509.IPAddress(IPv4Address(ip)))
        if dns:
            names.append(x509.DNSName(dns))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(self.cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=24))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


# -- a recording TLS server ---------------------------------------------------------------------


@dataclass
class Recorder:
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    bundle: list[str] = field(default_factory=list)
    #: Called for POST register with the parsed body; returns (status, json body) or None to drop the connection.
    on_register: Callable[[dict], tuple[int, dict] | None] = lambda body: (401, {"detail": "token expired"})

    def raw(self) -> bytes:
        return b"".join(f"{m} {p} {h}".encode() + b for m, p, h, b in self.requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "RecordingServer"

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.recorder.requests.append((self.command, self.path, dict(self.headers), body))
        return body

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._record()
        if self.path == TRUST_BUNDLE_PATH:
            self._send(200, {"ca_pems": self.server.recorder.bundle, "trust_domain": "test"})
        else:
            self._send(404, {"detail": "not found"})

    def do_POST(self) -> None:
        body = self._record()
        answer = self.server.recorder.on_register(json.loads(body)) if self.path == REGISTER_PATH else (404, {})
        if answer is None:  # a lost response: the request arrived, the reply never does
            self.close_connection = True
            return
        self._send(*answer)

    def log_message(self, *args: object) -> None:
        pass


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    recorder: Recorder


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Recorder]]]:
    servers: list[tuple[RecordingServer, threading.Thread]] = []

    def start(server_ca: CA, bundle: list[str], *, ip: str | None = "127.0.0.1", dns: str | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem = server_ca.issue(key.public_key(), ip=ip, dns=dns)
        d = tmp_path / f"srv{len(servers)}"
        d.mkdir()
        (d / "cert.pem").write_text(cert_pem)
        (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
        server = RecordingServer(("127.0.0.1", 0), _Handler)
        server.recorder = Recorder(bundle=bundle)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"https://127.0.0.1:{server.server_address[1]}", server.recorder

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def no_sleep(_: float) -> None:
    pass


def enroll(url: str, token: RegistrationToken, state: Path, **kw):
    return register(url, str(token), "edge-1", Keystore(state, "file"), "0.1.0", sleep=no_sleep, timeout=10, **kw)


# -- tests --------------------------------------------------------------------------------------


def test_pin_mismatch_aborts_before_the_secret_is_sent(serve, tmp_path: Path) -> None:
    gateway_ca, other_ca = CA.create("gateway"), CA.create("the one in the token")
    url, rec = serve(gateway_ca, [gateway_ca.pem])
    token = RegistrationToken.mint(spki_pin(other_ca.pem))
    with pytest.raises(PinMismatch, match="token was not sent"):
        enroll(url, token, tmp_path / "state")
    assert [(m, p) for m, p, _, _ in rec.requests] == [("GET", TRUST_BUNDLE_PATH)]
    assert token.secret.encode() not in rec.raw()
    assert not (tmp_path / "state" / "identity.json").exists()


def test_matching_pin_sends_the_token_over_verified_tls(serve, tmp_path: Path) -> None:
    # Control for the test above: the recorder does see the register call and the secret when the pin matches.
    ca = CA.create("gateway")
    url, rec = serve(ca, [ca.pem])
    token = RegistrationToken.mint(spki_pin(ca.pem))
    with pytest.raises(RegistrationRefused, match="token expired"):
        enroll(url, token, tmp_path / "state")
    assert [(m, p) for m, p, _, _ in rec.requests] == [("GET", TRUST_BUNDLE_PATH), ("POST", REGISTER_PATH)]
    body = json.loads(rec.requests[1][3])
    assert body["token"] == str(token) and "BEGIN CERTIFICATE REQUEST" in body["csr_pem"]


def test_a_foreign_ca_added_to_the_bundle_is_not_trusted(serve, tmp_path: Path) -> None:
    # An interceptor that serves the real CA in the bundle (so the pin matches) next to its own, with a
    # server certificate from its own: only pinned CAs are trusted, so the POST never happens.
    real, rogue = CA.create("gateway"), CA.create("interceptor")
    url, rec = serve(rogue, [real.pem, rogue.pem])
    token = RegistrationToken.mint(spki_pin(real.pem))
    with pytest.raises(ServerCertInvalid):
        enroll(url, token, tmp_path / "state")
    assert [(m, p) for m, p, _, _ in rec.requests] == [("GET", TRUST_BUNDLE_PATH)]
    assert token.secret.encode() not in rec.raw()


def test_host_name_is_checked_before_the_secret_is_sent(serve, tmp_path: Path) -> None:
    ca = CA.create("gateway")
    url, rec = serve(ca, [ca.pem], ip=None, dns="gateway.example.com")  # reached as 127.0.0.1
    with pytest.raises(ServerCertInvalid, match="does not verify"):
        enroll(url, RegistrationToken.mint(spki_pin(ca.pem)), tmp_path / "state")
    assert [m for m, _, _, _ in rec.requests] == ["GET"]


def test_lost_response_is_retried_with_the_same_key_and_the_identity_stored(serve, tmp_path: Path) -> None:
    ca = CA.create("gateway")
    url, rec = serve(ca, [ca.pem])
    answers = iter([None, None])  # two lost responses, then success

    def on_register(body: dict) -> tuple[int, dict] | None:
        lost = next(answers, "ok")
        if lost is None:
            return None
        csr = x509.load_pem_x509_csr(body["csr_pem"].encode())
        return 200, {
            "agent_id": "ag_123", "name": body["name"], "queues": ["eu_pii"], "region": "eu-west",
            "cert_pem": ca.issue(csr.public_key(), client=True), "ca_pems": [ca.pem],
            "cert_not_after": (datetime.now(timezone.utc) + timedelta(hours=24)).isoformat(),
            "executor": "executor_plugin.executor.EdgeAgentExecutor",
        }

    rec.on_register = on_register
    state = tmp_path / "state"
    ident = enroll(url, RegistrationToken.mint(spki_pin(ca.pem)), state)
    posts = [json.loads(b) for m, _, _, b in rec.requests if m == "POST"]
    assert len(posts) == 3
    assert posts[0]["csr_pem"] == posts[1]["csr_pem"] == posts[2]["csr_pem"]  # same key each time
    assert (ident.agent_id, ident.queues, ident.region, ident.url) == ("ag_123", ("eu_pii",), "eu-west", url)
    assert Keystore(state).load() == ident
    assert oct((state / "agent.key").stat().st_mode & 0o777) == "0o600"


def test_existing_identity_needs_force(serve, tmp_path: Path) -> None:
    ca = CA.create("gateway")
    url, rec = serve(ca, [ca.pem])
    state = tmp_path / "state"
    state.mkdir()
    (state / "identity.json").write_text("{}")
    with pytest.raises(Exception, match="--force"):
        enroll(url, RegistrationToken.mint(spki_pin(ca.pem)), state)
    assert rec.requests == []


def test_local_checks_come_first(tmp_path: Path) -> None:
    token = RegistrationToken.mint(b"\x00" * 32)
    with pytest.raises(InvalidURL, match="https://"):
        enroll("http://127.0.0.1:1", token, tmp_path)
    parts = str(token).split("_")
    parts[2] = ("a" if parts[2][0] != "a" else "b") + parts[2][1:]  # a typo in the secret
    with pytest.raises(TokenInvalid, match="checksum"):
        register("https://127.0.0.1:1", "_".join(parts), None, Keystore(tmp_path), "0.1.0")
