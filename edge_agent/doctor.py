"""``edge-agent doctor``: walks the path from this machine to the gateway one step at a time.

Each step is a :class:`Check` with a status, a one-line detail and, when it fails, a one-line fix:

``proxy``         which proxy the agent's HTTPS client uses for the gateway (the same rules as httpx:
                  ``HTTPS_PROXY``/``ALL_PROXY``, ``NO_PROXY``), credentials redacted
``dns``           the name the agent must resolve (the proxy's when there is one, else the gateway's)
``tcp``           a TCP connection to it
``connect``       the proxy's answer to ``CONNECT host:port`` (407 = authentication, 403 = policy)
``tls``           the handshake, verified against the agent's CA bundle only (never the OS store)
``interception``  whether the certificate presented comes from our CA: a TLS-inspecting proxy presents
                  its own, and mutual TLS cannot pass through it
``ca_pin``        the gateway's trust bundle against the pin (from a token, or the stored CA)
``clock``         the skew between this machine and the gateway (its ``Date`` header)
``identity``      with a stored identity: whether the gateway accepts this agent's certificate, asked
                  through the agent's real HTTPS client (so its proxy handling is checked too)

A check that cannot run because an earlier one failed is ``skip``. Nothing secret is sent: the
trust bundle is public and the client certificate proves possession without revealing the key.
"""

from __future__ import annotations

import base64
import email.utils
import hmac
import http.client
import json
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol import TRUST_BUNDLE_PATH
from edge_agent.transport import USER_AGENT, normalize_url

if TYPE_CHECKING:
    from edge_agent.identity.keystore import StoredIdentity

Status = Literal["ok", "warn", "fail", "skip"]

#: Certificates are backdated a few minutes; beyond this a fresh certificate may look "not yet valid".
CLOCK_FAIL_SECONDS = 300.0
CLOCK_WARN_SECONDS = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "warn", "skip")


@dataclass(frozen=True)
class Report:
    url: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


# -- proxy selection (the rules of httpx 0.28's trust_env, applied to a given environment) ------------


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None
    password: str | None
    source: str

    @property
    def display(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"http://{user}{self.host}:{self.port}"


def _proxy_env(env: Mapping[str, str]) -> dict[str, str]:
    # urllib.request.getproxies_environment: any *_proxy variable; a lower-case one wins.
    found: dict[str, str] = {}
    for key, value in env.items():
        if value and key.lower().endswith("_proxy") and key != key.lower():
            found[key.lower()[:-6]] = value
    for key, value in env.items():
        if value and key.lower().endswith("_proxy") and key == key.lower():
            found[key[:-6]] = value
    return found


def proxy_for(url: str, env: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy the agent's client uses for ``url`` under ``env``, or None for a direct connection."""
    import httpx
    from httpx._utils import (
        URLPattern,  # httpx is pinned <0.29: the class that decides mounts
    )

    env = os.environ if env is None else env
    info = _proxy_env(env)
    mounts: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if info.get(scheme):
            value = info[scheme]
            mounts[f"{scheme}://"] = value if "://" in value else f"http://{value}"
    for host in (h.strip() for h in info.get("no", "").split(",")):
        if host == "*":
            return None
        if not host:
            continue
        if "://" in host:
            mounts[host] = None
        elif _is_ip(host.split("/")[0]):
            mounts[f"all://[{host}]" if ":" in host.split("/")[0] else f"all://{host}"] = None
        elif host.lower() == "localhost":
            mounts[f"all://{host}"] = None
        else:
            mounts[f"all://*{host}"] = None
    target = httpx.URL(url)
    for pattern, proxy_url in sorted(((URLPattern(k), v) for k, v in mounts.items()), key=lambda kv: kv[0]):
        if pattern.matches(target):
            if proxy_url is None:
                return None
            parts = urlsplit(proxy_url)
            source = "ALL_PROXY" if pattern.pattern == "all://" else f"{pattern.pattern.split(':')[0].upper()}_PROXY"
            return Proxy(
                host=parts.hostname or "", port=parts.port or (443 if parts.scheme == "https" else 80),
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                source=source,
            )
    return None


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- the walk -------------------------------------------------------------------------------------------


class _Stop(Exception):
    """An earlier check failed: the later ones are skipped."""


def diagnose(
    url: str,
    *,
    ca_pems: Sequence[str] | None = None,
    pins: Sequence[bytes] = (),
    identity: "StoredIdentity | None" = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    now: datetime | None = None,
) -> Report:
    """Run every check against the gateway at ``url``.

    ``ca_pems``: the CA bundle the agent trusts (from its identity); None before registration, when
    only ``pins`` (from the token) are known. ``identity`` adds the ``identity`` check.
    """
    env = os.environ if env is None else env
    base = normalize_url(url)
    parts = urlsplit(base)
    host, port = parts.hostname or "", parts.port or 443
    checks: list[Check] = []
    order = ["proxy", "dns", "tcp", "connect", "tls", "interception", "ca_pin", "clock", "identity"]

    def add(name: str, status: Status, detail: str, fix: str | None = None) -> None:
        checks.append(Check(name, status, detail, fix))

    proxy = proxy_for(base, env)
    if proxy is None:
        add("proxy", "ok", "direct connection (no HTTPS_PROXY/ALL_PROXY, or NO_PROXY matches)")
    else:
        add("proxy", "ok", f"through {proxy.display} (from {proxy.source})")
    try:
        sock = _connect(host, port, proxy, timeout, add)
        tls_info = _tls(sock, host, port, proxy, ca_pems, timeout, add)
        bundle, date = _trust_bundle(tls_info, host, port, timeout, add)
        _check_pin(bundle, pins, ca_pems, add)
        _check_interception(tls_info, bundle, host, port, add)
        _check_clock(date, now, add)
        if identity is not None:
            _check_identity(identity, timeout, add)
    except _Stop:
        pass
    done = {c.name for c in checks}
    for name in order:
        if name in done or (name == "connect" and proxy is None) or (name == "identity" and identity is None):
            continue
        checks.append(Check(name, "skip", "not checked: an earlier step failed"))
    checks.sort(key=lambda c: order.index(c.name))
    return Report(url=base, checks=tuple(checks))


def _connect(host: str, port: int, proxy: Proxy | None, timeout: float, add: Any) -> socket.socket:
    peer_host, peer_port = (proxy.host, proxy.port) if proxy else (host, port)
    what = f"proxy {peer_host}" if proxy else peer_host
    try:
        infos = socket.getaddrinfo(peer_host, peer_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        add("dns", "fail", f"cannot resolve {what}: {exc.strerror or exc}",
            "check the host name, /etc/resolv.conf and that this network's DNS knows it"
            + ("" if proxy else " (or set HTTPS_PROXY if only a proxy may reach the internet)"))
        raise _Stop from None
    addrs = sorted({info[4][0] for info in infos})
    add("dns", "ok", f"{what} is {', '.join(addrs[:4])}" + (" (the proxy resolves the gateway)" if proxy else ""))

    try:
        sock = socket.create_connection((peer_host, peer_port), timeout=timeout)
    except OSError as exc:
        add("tcp", "fail", f"cannot connect to {what}:{peer_port}: {exc.strerror or exc}",
            f"allow outbound TCP from this machine to {peer_host}:{peer_port} in the firewall")
        raise _Stop from None
    add("tcp", "ok", f"connected to {what}:{peer_port}")

    if proxy is None:
        return sock
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
    if proxy.username is not None:
        cred = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
        request += f"Proxy-Authorization: Basic {cred}\r\n"
    try:
        sock.sendall((request + "\r\n").encode("latin-1"))
        status, reason = _read_connect_reply(sock)
    except OSError as exc:
        sock.close()
        add("connect", "fail", f"the proxy dropped the CONNECT to {host}:{port}: {exc}",
            "check HTTPS_PROXY: it must be an HTTP proxy that supports CONNECT")
        raise _Stop from None
    if status == 200:
        add("connect", "ok", f"the proxy opened a tunnel to {host}:{port}")
        return sock
    sock.close()
    if status == 407:
        add("connect", "fail", f"the proxy wants authentication ({status} {reason})",
            "put the proxy account in HTTPS_PROXY (http://user:password@proxy:port); NTLM/Kerberos-only "
            "proxies need a local helper such as cntlm")
    else:
        add("connect", "fail", f"the proxy refused CONNECT {host}:{port} ({status} {reason})",
            f"ask the proxy's administrators to allow {host}:{port}, or add it to NO_PROXY if it is reachable directly")
    raise _Stop


def _read_connect_reply(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("connection closed before a reply")
        data += chunk
        if len(data) > 65536:
            raise OSError("reply header too long")
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    fields = line.split(" ", 2)
    try:
        return int(fields[1]), (fields[2] if len(fields) > 2 else "")
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP reply: {line[:80]!r}") from None


@dataclass
class _TLS:
    sock: ssl.SSLSocket
    leaf_der: bytes
    verified: bool


def _tls(sock: socket.socket, host: str, port: int, proxy: Proxy | None, ca_pems: Sequence[str] | None,
         timeout: float, add: Any) -> _TLS:
    from edge_agent.transport import tls_context

    ctx = tls_context(list(ca_pems) if ca_pems else None)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        reason = exc.verify_message or str(exc)
        # Look at what was presented, without trusting it, to tell interception from a broken cert.
        raw = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        raw.check_hostname = False
        raw.verify_mode = ssl.CERT_NONE
        try:
            again = _connect_quiet(host, port, proxy, timeout)
            with raw.wrap_socket(again, server_hostname=host) as probe:
                leaf = probe.getpeercert(binary_form=True) or b""
        except OSError:
            leaf = b""
        issuer = _issuer(leaf)
        if ca_pems and leaf and not _issued_by_any(leaf, ca_pems):
            add("tls", "fail", f"the certificate presented for {host} is not from the agent's CA ({reason})")
            add("interception", "fail",
                f"{host}:{port} presented a certificate issued by '{issuer}': a TLS-inspecting proxy or another "
                "server answers", f"ask your network team to exempt {host}:{port} from TLS inspection "
                "(mutual TLS cannot pass it), or fix the URL")
        else:
            add("tls", "fail", f"the gateway's certificate does not verify: {reason}",
                "check that the URL's host name is the gateway's (the certificate names it); ask the Airflow "
                "admin to renew the gateway certificate if it expired")
        raise _Stop from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        add("tls", "fail", f"TLS handshake with {host}:{port} failed: {exc}",
            "the port may not speak TLS (wrong port?), or a middlebox breaks the handshake")
        raise _Stop from None
    leaf = tls.getpeercert(binary_form=True) or b""
    verified = bool(ca_pems)
    add("tls", "ok", f"{tls.version()} with {host}:{port}; certificate issued by '{_issuer(leaf)}'"
        + ("" if verified else " (not verified yet: no CA bundle before registration; the pin decides)"))
    return _TLS(sock=tls, leaf_der=leaf, verified=verified)


def _connect_quiet(host: str, port: int, proxy: Proxy | None, timeout: float) -> socket.socket:
    checks: list[Any] = []

    def add(*args: Any) -> None:
        checks.append(args)

    try:
        return _connect(host, port, proxy, timeout, add)
    except _Stop:
        raise OSError("could not reconnect") from None


def _trust_bundle(tls: _TLS, host: str, port: int, timeout: float, add: Any) -> tuple[list[str], str | None]:
    from edge_agent.protocol import TrustBundle

    tls.sock.settimeout(timeout)
    try:
        request = (f"GET {TRUST_BUNDLE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
                   "Accept: application/json\r\nConnection: close\r\n\r\n")
        tls.sock.sendall(request.encode("ascii"))
        resp = http.client.HTTPResponse(tls.sock)  # type: ignore[arg-type]
        resp.begin()
        body = resp.read(1_000_000)
        date = resp.getheader("Date")
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        add("ca_pin", "fail", f"no answer to {TRUST_BUNDLE_PATH}: {exc}",
            "check that the URL points at the edge-agent gateway (airflow edge-agents gateway), not another server")
        raise _Stop from None
    finally:
        tls.sock.close()
    if status != 200:
        add("ca_pin", "fail", f"{TRUST_BUNDLE_PATH} answered {status}",
            "check that the URL points at the edge-agent gateway, including any path prefix")
        raise _Stop
    try:
        bundle = TrustBundle.model_validate(json.loads(body)).ca_pems
    except ValueError as exc:
        add("ca_pin", "fail", f"{TRUST_BUNDLE_PATH} did not return a trust bundle: {str(exc).splitlines()[0]}",
            "check that the URL points at the edge-agent gateway")
        raise _Stop from None
    return bundle, date


def _check_pin(bundle: Sequence[str], pins: Sequence[bytes], ca_pems: Sequence[str] | None, add: Any) -> None:
    from edge_agent.identity.pki_utils import spki_pin

    served = [spki_pin(p) for p in bundle]
    if pins:
        if any(hmac.compare_digest(s, p) for s in served for p in pins):
            add("ca_pin", "ok", "the gateway's CA matches the pin in the token")
        else:
            add("ca_pin", "fail", "the gateway's CA does not match the pin in the token",
                "check the URL and the token (both come from the same Airflow deployment), and that no "
                "TLS-inspecting proxy sits in between")
        return
    if ca_pems:
        stored = [spki_pin(p) for p in ca_pems]
        if not any(s in served for s in stored):
            add("ca_pin", "fail", "the gateway no longer serves the CA this agent trusts",
                "the deployment's CA was replaced: re-register with a new token ('edge-agent register --force')")
        elif any(s not in stored for s in served):
            add("ca_pin", "warn", "the gateway also serves a CA this agent does not have yet (CA rotation in progress)")
        else:
            add("ca_pin", "ok", "the gateway serves the CA this agent trusts")
        return
    add("ca_pin", "skip", "no pin to compare with (give a token, or register first)")


def _check_interception(tls: _TLS, bundle: Sequence[str], host: str, port: int, add: Any) -> None:
    if tls.verified:
        add("interception", "ok", "the certificate presented is from the agent's CA: no TLS inspection")
        return
    if _issued_by_any(tls.leaf_der, bundle):
        add("interception", "ok", "the certificate presented is from the gateway's CA: no TLS inspection")
        return
    add("interception", "fail",
        f"{host}:{port} presented a certificate issued by '{_issuer(tls.leaf_der)}', not by the gateway's CA: a "
        "TLS-inspecting proxy sits in between",
        f"ask your network team to exempt {host}:{port} from TLS inspection (mutual TLS cannot pass it)")


def _check_clock(date: str | None, now: datetime | None, add: Any) -> None:
    if not date:
        add("clock", "skip", "the gateway sent no Date header")
        return
    try:
        server = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        add("clock", "skip", f"unreadable Date header {date!r}")
        return
    local = now or datetime.now(timezone.utc)
    skew = (local - server).total_seconds()
    text = f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the gateway's"
    fix = "turn on time synchronisation (timedatectl set-ntp true, or chrony/ntpd)"
    if abs(skew) > CLOCK_FAIL_SECONDS:
        add("clock", "fail", text + ": certificates will look expired or not yet valid", fix)
    elif abs(skew) > CLOCK_WARN_SECONDS:
        add("clock", "warn", text, fix)
    else:
        add("clock", "ok", text + " (within the date header's 1 s resolution)" if abs(skew) < 2 else text)


def _check_identity(identity: "StoredIdentity", timeout: float, add: Any) -> None:
    from edge_agent.client import AgentAPI
    from edge_agent.errors import IdentityRejected
    from edge_agent.transport import build_client

    if identity.expired():
        add("identity", "fail", f"this agent's certificate expired at {identity.cert_not_after:%Y-%m-%d %H:%M} UTC",
            "re-register with a new token ('edge-agent register --force ...')")
        return
    api = AgentAPI(build_client(identity.url, identity, timeout))
    try:
        who = api.whoami()
    except IdentityRejected as exc:
        add("identity", "fail", str(exc), "re-register with a new token ('edge-agent register --force ...')")
        return
    except EdgeAgentError as exc:
        add("identity", "fail", f"the agent's own client could not ask the gateway: {exc}",
            "compare with the checks above: the agent uses the same proxy settings")
        return
    finally:
        api.close()
    add("identity", "ok", f"the gateway accepts this agent as {who.agent_id} (state {who.state})")


def _issuer(der: bytes) -> str:
    if not der:
        return "?"
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).issuer.rfc4514_string() or "(empty issuer)"
    except ValueError:
        return "(unreadable certificate)"


def _issued_by_any(leaf_der: bytes, ca_pems: Sequence[str]) -> bool:
    from cryptography import x509

    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return False
    for pem in ca_pems:
        try:
            leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(pem.encode("ascii")))
            return True
        except Exception:  # InvalidSignature, a key type mismatch (TypeError), a bad PEM (ValueError)
            continue
    return False


def format_report(report: Report) -> list[str]:
    """Human lines: one per check, its fix indented under a failure or warning."""
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    lines = [f"edge-agent doctor: {report.url}"]
    for c in report.checks:
        lines.append(f"  {marks[c.status]} {c.name:<13}{c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"       {'':<13}fix: {c.fix}")
    lines.append("all checks passed" if report.ok else "some checks failed: see 'fix:' above")
    return lines


__all__ = ["Check", "Proxy", "Report", "diagnose", "format_report", "proxy_for"]
