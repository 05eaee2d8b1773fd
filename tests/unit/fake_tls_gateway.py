"""A fake gateway over real mutual TLS, for agent tests that need real certificates on the wire.

It uses the hosted side's real CA code (``executor_plugin.pki``) to issue the agent's certificates,
requires a client certificate from that CA, and records the serial of the certificate each request
came with, so a test can see which credentials a connection used. Routes: ``renew`` (signs the CSR
with a short TTL), ``self`` (DELETE), ``whoami``, ``/execution/who`` (answers with the serial) and
``/execution/slow`` (held until the test releases it). ``status_for`` forces a status per path.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent import protocol as p
from edge_agent.identity.keystore import StoredIdentity
from edge_agent.identity.pki_utils import cert_not_after, generate_key, make_csr
from executor_plugin.pki import CertificateAuthority

TRUST_DOMAIN = "unit.edge-agent.test"
WAIT = 60.0


@dataclass
class Call:
    method: str
    path: str
    serial: str | None


class FakeTLSGateway:
    def __init__(self, tmp_path: Path, *, ttl: timedelta = timedelta(hours=1)) -> None:
        self.ca, _ = CertificateAuthority.init(tmp_path / "ca")
        self.ttl = ttl
        self.cond = threading.Condition()
        self.calls: list[Call] = []
        self.status_for: dict[str, int] = {}
        #: Renewals to answer with 503 before signing.
        self.renew_failures = 0
        self.renewals = 0
        self.release = threading.Event()
        cert_pem, key_pem = self.ca.issue_server_cert(["127.0.0.1"], timedelta(hours=1))
        (tmp_path / "server.pem").write_text(cert_pem)
        (tmp_path / "server.key").write_text(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.ca.cert_pem)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                der = self.connection.getpeercert(binary_form=True)
                serial = format(x509.load_der_x509_certificate(der).serial_number, "x") if der else None
                status, reply = gateway.handle(self.command, self.path, body, serial)
                data = json.dumps(reply).encode() if reply is not None else b""
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(WAIT)

    # -- agent identities ------------------------------------------------------------------------

    def sign(self, csr_pem: str, agent_id: str = "ag_1") -> tuple[str, str]:
        cert_pem, serial, _ = self.ca.sign_agent_csr(csr_pem, agent_id=agent_id, trust_domain=TRUST_DOMAIN,
                                                     ttl=self.ttl)
        return cert_pem, serial

    def enroll(self, agent_id: str = "ag_1") -> tuple[StoredIdentity, str]:
        """A stored identity as registration would leave it; returns it and its certificate serial."""
        key = generate_key()
        cert_pem, serial = self.sign(make_csr(key, "edge-1"), agent_id)
        identity = StoredIdentity(
            agent_id=agent_id, name="edge-1", queues=("default",), region="eu", url=self.url,
            executor="executor_plugin.executor.EdgeAgentExecutor", cert_not_after=cert_not_after(cert_pem),
            cert_pem=cert_pem, ca_pems=(self.ca.cert_pem,),
            key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
        )
        return identity, serial

    # -- routes ----------------------------------------------------------------------------------

    def wait_for(self, predicate: Any, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=WAIT), f"timed out waiting for {what}: {self.calls}"

    def handle(self, method: str, path: str, body: bytes, serial: str | None) -> tuple[int, Any]:
        with self.cond:
            self.calls.append(Call(method, path, serial))
            self.cond.notify_all()
            forced = self.status_for.get(path)
        if forced:
            return forced, {"detail": f"forced {forced}"}
        if path == p.RENEW_PATH and method == "POST":
            with self.cond:
                if self.renew_failures > 0:
                    self.renew_failures -= 1
                    return 503, {"detail": "try again"}
            request = p.RenewRequest.model_validate_json(body)
            cert_pem, _ = self.sign(request.csr_pem)
            with self.cond:
                self.renewals += 1
                self.cond.notify_all()
            return 200, p.AgentIdentity(
                agent_id="ag_1", name="edge-1", queues=["default"], region="eu", cert_pem=cert_pem,
                ca_pems=[self.ca.cert_pem], cert_not_after=cert_not_after(cert_pem),
                executor="executor_plugin.executor.EdgeAgentExecutor",
            ).model_dump(mode="json")
        if path == p.SELF_PATH and method == "DELETE":
            return 204, None
        if path == p.WHOAMI_PATH:
            return 200, {"agent_id": "ag_1", "name": "edge-1", "queues": ["default"], "region": "eu",
                         "state": "active"}
        if path == "/execution/slow":
            self.release.wait(WAIT)
            return 200, {"serial": serial}
        if path == "/execution/who":
            return 200, {"serial": serial}
        return 404, {"detail": "no route"}


__all__ = ["Call", "FakeTLSGateway", "TRUST_DOMAIN"]
